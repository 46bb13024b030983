"""``linft data check``: is a dataset usable? Layout, counts per domain and class, unreadable files.

Classes are counted by class *folder* name: a domain whose set of class folders differs from the
union over domains is a problem (labels would not line up); an empty class folder is a warning.
Every image is fully decoded unless ``quick`` (header only), so a truncated JPEG is found here and
not in the middle of a run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from linft.data.datasets import FOLDER_DATASETS, MEMORY_DATASETS, available, scan_layout
from linft.data.environments import load_image
from linft.data.errors import CorruptImageError, DataError
from linft.errors import LinftError

MAX_CLASS_ROWS = 20


@dataclass
class CheckReport:
    """``counts[env][cls]`` images per domain and class; ``ok`` when ``problems`` is empty."""

    dataset: str
    source: str = ""
    environments: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        envs = [e for e in self.environments if e in self.counts]
        if not envs:
            return ""
        rows = []
        if len(self.classes) <= MAX_CLASS_ROWS:
            rows += [(c, [self.counts[e].get(c, 0) for e in envs]) for c in self.classes]
        else:
            rows += [("classes", [sum(v > 0 for v in self.counts[e].values()) for e in envs]),
                     ("min/class", [min(self.counts[e].values(), default=0) for e in envs]),
                     ("max/class", [max(self.counts[e].values(), default=0) for e in envs])]
        rows.append(("total", [sum(self.counts[e].values()) for e in envs]))
        w0 = max(len("class"), *(len(r[0]) for r in rows))
        w = max(7, *(len(e) + 1 for e in envs))
        lines = ["class".ljust(w0) + "".join(e.rjust(w) for e in envs)]
        lines += [name.ljust(w0) + "".join(str(v).rjust(w) for v in vals) for name, vals in rows]
        return "\n".join(lines)

    def format(self) -> str:
        n = sum(sum(c.values()) for c in self.counts.values())
        head = (f"{self.dataset}: {len(self.counts)} of {len(self.environments)} domains, "
                f"{len(self.classes)} classes, {n} images" + (f" ({self.source})" if self.source else ""))
        parts = [head, self.table()]
        parts += [f"warning: {w}" for w in self.warnings]
        parts += [f"problem: {p}" for p in self.problems]
        parts.append("OK" if self.ok else f"{len(self.problems)} problem(s)")
        return "\n".join(p for p in parts if p)


def _readable(path, quick: bool) -> str | None:
    """None if ``path`` decodes, else the reason."""
    try:
        if quick:
            with Image.open(path) as im:
                im.verify()
        else:
            load_image(path)
    except CorruptImageError as e:
        return str(e.__cause__ or e)
    except Exception as e:  # verify() raises assorted types on garbage
        return f"{type(e).__name__}: {e}"
    return None


def check_folder_dataset(name: str, root, quick: bool = False, max_listed: int = 10) -> CheckReport:
    lay = scan_layout(name, root)
    rep = CheckReport(name, str(lay.root / lay.spec.subdir), list(lay.spec.environments), lay.classes)
    rep.problems += lay.problems
    rep.warnings += [f"domain {e!r} has an empty class folder {c!r}" for e, c in lay.empty_classes]
    bad = []
    for env, per_class in lay.files.items():
        rep.counts[env] = {c: len(p) for c, p in per_class.items()}
        for paths in per_class.values():
            for p in paths:
                why = _readable(p, quick)
                if why is not None:
                    bad.append(f"{p} ({why})")
    if bad:
        listed = "; ".join(bad[:max_listed]) + (f"; ... {len(bad) - max_listed} more" if len(bad) > max_listed else "")
        rep.problems.append(f"{len(bad)} unreadable image(s): {listed}")
    return rep


def check_memory_dataset(name: str, root, **options) -> CheckReport:
    from linft.data.datasets import get_dataset
    rep = CheckReport(name)
    try:
        ds = get_dataset(name, root, **options)
    except LinftError as e:
        rep.problems.append(str(e))
        return rep
    rep.source, rep.environments, rep.classes = ds.source, list(ds.environments), list(ds.classes)
    for env in ds.envs:
        rep.counts[env.name] = {c: int((env.labels == i).sum()) for i, c in enumerate(ds.classes)}
        if len(env) == 0:
            rep.problems.append(f"domain {env.name!r} is empty")
        if len(env) and (env.labels.min() < 0 or env.labels.max() >= ds.num_classes):
            rep.problems.append(f"domain {env.name!r} has labels outside 0..{ds.num_classes - 1}")
        missing = [c for c, n in rep.counts[env.name].items() if n == 0]
        if missing:
            rep.problems.append(f"domain {env.name!r} has no image of class(es) {missing}")
    return rep


def check_dataset(name: str, root=None, quick: bool = False, **options) -> CheckReport:
    """A :class:`CheckReport` for dataset ``name`` under ``root`` (never raises on bad data)."""
    if name in FOLDER_DATASETS:
        if root is None:
            rep = CheckReport(name)
            rep.problems.append(f"{name} needs --root DIR (the folder holding {FOLDER_DATASETS[name].subdir}/)")
            return rep
        return check_folder_dataset(name, root, quick)
    if name in MEMORY_DATASETS:
        return check_memory_dataset(name, root, **options)
    raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(available())}")
