"""``linft data download NAME --root DIR`` and ``linft data check NAME [--root DIR]``."""
from __future__ import annotations

import argparse

from linft.cli.helpfmt import LazyHelpFormatter
from linft.data.errors import DataError


def _download_names() -> str:
    from linft.data.download import ALIASES, SOURCES
    return "one of: " + ", ".join(list(SOURCES) + list(ALIASES))


def _base_url_help() -> str:
    from linft.data.download import BASE_URL_ENV
    return f"fetch every file as BASE_URL/<file name> (a mirror); default ${BASE_URL_ENV} or the original URLs"


def _check_names() -> str:
    from linft.data.datasets import available
    return "one of: " + ", ".join(available())


def register(sub) -> None:
    """Add the ``data`` command (with ``download`` and ``check``) to argparse subparsers ``sub``."""
    p = sub.add_parser("data", help="download and check datasets",
                       description="Download DomainBed's datasets and check dataset folders.")
    dsub = p.add_subparsers(dest="data_command", required=True)

    d = dsub.add_parser("download", help="download a dataset (needs a network)", formatter_class=LazyHelpFormatter,
                        description="Download, verify and atomically install a dataset under --root.")
    d.add_argument("name", help=_download_names)
    d.add_argument("--root", required=True, help="data folder (DomainBed's --data_dir)")
    d.add_argument("--base-url", default=None,
                   help=_base_url_help)
    d.add_argument("--sha256", action="append", metavar="[FILE=]HEX",
                   help="expected sha256 of a file whose checksum linft does not know (repeatable)")
    d.add_argument("--no-verify", action="store_true",
                   help="skip checksum verification (by default a file with no published checksum is recorded at its first download and verified on later ones)")
    d.set_defaults(func=cmd_download)

    c = dsub.add_parser("check", help="check a dataset's layout and images", formatter_class=LazyHelpFormatter,
                        description="Layout, images per domain and class, unreadable images, class sets.")
    c.add_argument("name", help=_check_names)
    c.add_argument("--root", default=None, help="data folder (optional for the MNIST-derived datasets)")
    c.add_argument("--quick", action="store_true", help="read image headers only instead of decoding")
    c.set_defaults(func=cmd_check)


def cmd_download(args: argparse.Namespace) -> int:
    from linft.data.download import download
    download(args.name, args.root, base_url=args.base_url, sha256=args.sha256, no_verify=args.no_verify)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from linft.data.check import check_dataset
    report = check_dataset(args.name, args.root, quick=args.quick)
    print(report.format())
    if not report.ok:
        raise DataError(f"{args.name} check failed: " + "; ".join(report.problems))
    return 0
