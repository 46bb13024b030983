"""What an analysis declares, once: :class:`Option` (a typed option with its default and help line)
and :class:`Analysis` (kind, how many runs it reads, options, summary metrics, figure, compute).

From these declarations come the CLI flags and help of ``linft analyze KIND``, the validation of
unknown options, the analysis id (a hash of the run ids and of the options marked ``semantic``),
the rows that ``linft collect`` / ``linft report`` summarise and the figures they draw; see
:mod:`linft.analysis.registry` for how an analysis is run and stored.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from linft.errors import LinftError

_TYPES = (bool, int, float, str, tuple)


@dataclass(frozen=True)
class Option:
    """One option of an analysis. ``type`` is taken from ``default`` unless given (bool, int, float,
    str, or tuple -- a sequence of ``item``, written ``a,b,c`` on the command line, stored as a
    list). ``semantic=False`` marks an option that never changes a number (device, engine, memory
    budget): it is left out of the analysis id."""
    name: str
    default: Any
    help: str
    type: type | None = None
    item: type = float
    choices: tuple | None = None
    semantic: bool = True

    @property
    def kind(self) -> type:
        t = self.type or type(self.default)
        if t is list:
            t = tuple
        if t not in _TYPES:
            raise TypeError(f"option {self.name}: type must be one of {_TYPES}, got {t}")
        return t

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any) -> Any:
        """``value`` converted to the option's type and checked against ``choices``; a wrong value
        is a :class:`LinftError` naming the option."""
        t = self.kind
        try:
            if t is bool:
                if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                    value = value.lower() in ("true", "1", "yes")
                if not isinstance(value, bool):
                    raise ValueError
                out: Any = value
            elif t is tuple:
                items = value.split(",") if isinstance(value, str) else list(value)
                out = [self.item(v.strip() if isinstance(v, str) else v) for v in items
                       if not (isinstance(v, str) and not v.strip())]
            elif t is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                out = int(value)
            elif t is float:
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
            else:
                out = str(value) if isinstance(value, str) else None
                if out is None:
                    raise ValueError
        except (TypeError, ValueError) as e:
            raise LinftError(f"option {self.name} must be {self.describe_type()}, got {value!r}") from e
        if self.choices is not None and (any(v not in self.choices for v in out) if t is tuple else out not in self.choices):
            raise LinftError(f"option {self.name} must be one of {self.choices}, got {value!r}")
        return out

    def describe_type(self) -> str:
        t = self.kind
        return f"comma-separated {self.item.__name__}s" if t is tuple else f"a {t.__name__}"


# options every analysis that reads runs takes (how the runs are loaded)
COMMON_OPTIONS = (
    Option("weights", "trainable", "which trained weights: the final ones or the trajectory average",
           choices=("trainable", "traj_avg")),
    Option("dtype", "float32", "precision of the evaluation", choices=("float32", "float64")),
    Option("device", "cpu", "where to evaluate: cpu, cuda, cuda:1 ...", semantic=False),
)


@dataclass(frozen=True)
class Analysis:
    """One analysis, declared in one module and registered with
    :func:`linft.analysis.registry.register`.

    - ``kind``: its name (``linft analyze KIND``, the rows' ``kind``, the folder prefix).
    - ``compute(runs, **options) -> (rows, info)``: ``runs`` are loaded runs
      (:class:`linft.analysis.loading.LoadedRun`, theta0 and theta_ft rebuilt) when ``reads="loaded"``,
      or run folders (:class:`pathlib.Path`) and a ``registry`` keyword (to run other analyses) when
      ``reads="paths"``; ``options`` are the declared ones, resolved (the common ``weights``,
      ``dtype``, ``device`` only for ``reads="paths"``). ``rows`` are tidy rows (``metric``,
      ``value`` and keys such as ``env``, ``role``, ``split``, ``alpha``); ``info`` goes into
      the folder's config.json.
    - ``runs``: (min, max) number of runs read; max ``None`` = no limit. The folder lives under the
      first run; ``ordered=False`` sorts the runs by id first (a set of members, e.g. a soup).
    - ``options``: its :class:`Option` s (the common ones are added unless ``common=False``);
      ``open_options=True`` passes undeclared options through to ``compute`` (which validates them).
    - ``summary``: metrics shown in the summary table of ``linft collect`` / ``linft report``,
      for the rows that ``headline`` keeps (default: pooled over domains, total level, t = 1);
      ``label``: row fields that name the variant in that table (e.g. ``definition``, ``form``).
    - ``figure``: ``(DataFrame of all rows, out_dir) -> list of files`` drawn by ``linft plot`` /
      ``linft report``, or the name of a function of :mod:`linft.results.plots_analysis`.
    - ``help``: one line for ``linft analyze --help`` and the report; ``doc``: more report text.
    """
    kind: str
    compute: Callable[..., tuple[list[dict], dict]]
    help: str
    runs: tuple[int, int | None] = (1, 2)
    options: tuple[Option, ...] = ()
    summary: tuple[str, ...] = ()
    label: tuple[str, ...] = ()
    headline: Callable[[dict], bool] | None = None
    figure: Callable | str | None = None
    reads: str = "loaded"
    ordered: bool = True
    common: bool = True
    open_options: bool = False
    doc: str = ""
    all_options: tuple[Option, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.kind or not self.kind.replace("_", "").isalnum():
            raise ValueError(f"analysis kind must be a plain name, got {self.kind!r}")
        if self.reads not in ("loaded", "paths"):
            raise ValueError(f"reads must be 'loaded' or 'paths', got {self.reads!r}")
        lo, hi = self.runs
        if lo < 1 or (hi is not None and hi < lo):
            raise ValueError(f"runs must be (min >= 1, max >= min or None), got {self.runs}")
        opts = (COMMON_OPTIONS if self.common else ()) + tuple(self.options)
        names = [o.name for o in opts]
        if len(set(names)) != len(names):
            raise ValueError(f"analysis {self.kind}: duplicate option names {names}")
        for o in opts:
            o.parse(o.default)  # a default must be a valid value
        object.__setattr__(self, "all_options", opts)

    # -- options -------------------------------------------------------------------------------
    def resolve(self, options: dict) -> dict:
        """``options`` validated and completed with the defaults (what the folder's config records)."""
        known = {o.name: o for o in self.all_options}
        unknown = sorted(set(options) - set(known))
        if unknown and not self.open_options:
            raise LinftError(f"unknown option(s) for {self.kind}: {', '.join(unknown)} "
                             f"(it takes {', '.join(known) or 'none'})")
        out = {name: o.parse(options.get(name, o.default)) for name, o in known.items()}
        out.update({k: options[k] for k in unknown})
        return out

    def check_runs(self, n: int) -> None:
        lo, hi = self.runs
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else f"{lo} to {hi}" if hi is not None else f"{lo} or more"
            raise LinftError(f"{self.kind} reads {want} run(s), got {n}")

    def analysis_id(self, run_ids: list[str], options: dict, non_semantic: set[str] = frozenset()) -> str:
        """``<kind>-<sha256[:12]>`` of the run ids (in order) and the semantic options."""
        skip = {o.name for o in self.all_options if not o.semantic} | set(non_semantic)
        semantic = {k: v for k, v in sorted(options.items()) if k not in skip}
        blob = json.dumps({"runs": list(run_ids), "options": semantic}, sort_keys=True, separators=(",", ":"),
                          default=str)
        return f"{self.kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    # -- summary ---------------------------------------------------------------------------------
    def is_headline(self, row: dict) -> bool:
        """Whether ``row`` is one the summary table (and ``linft analyze``'s printout) shows."""
        if self.headline is not None:
            return bool(self.headline(row))
        return (row.get("env") in (None, "pooled") and row.get("level") in (None, "total")
                and row.get("t") in (None, 1.0))
