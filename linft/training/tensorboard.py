"""``tensorboard=DIR`` (not semantic): every row a run writes is mirrored, as it is written, to
TensorBoard event files in ``DIR/<run id>/`` -- scalars ``eval/<model>/<metric>/<env>_<split>``,
``train/<metric>`` and ``select/<selection>/<model>/<metric>/<env>_<split>`` at the row's step, plus
the run's hyper-parameters (every semantic field, the HParams plugin). results.jsonl stays the
truth; the event files are a view. A resumed run purges the events past its checkpoint, as it does
its rows. Needs the ``tensorboard`` package (``pip install 'linft[tensorboard]'``).
"""
from __future__ import annotations

from pathlib import Path

from linft.errors import ConfigError
from linft.runs.config import RunConfig, field_docs


def row_tag(row: dict) -> str | None:
    kind = row.get("kind")
    if kind == "train":
        return f"train/{row['metric']}"
    if kind == "eval":
        return f"eval/{row['model']}/{row['metric']}/{row['env']}_{row['split']}"
    if kind == "select":
        return f"select/{row['selection']}/{row['model']}/{row['metric']}/{row['env']}_{row['split']}"
    return None


def hparams(cfg: RunConfig) -> dict:
    """The semantic fields (tuples as comma-joined strings) and the run id."""
    out = {"run_id": cfg.run_id}
    for d in field_docs():
        if d.semantic:
            v = getattr(cfg, d.name)
            out[d.name] = ",".join(map(str, v)) if isinstance(v, tuple) else v
    return out


def require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'linft[tensorboard]' "
                          "(or pip install tensorboard)") from None


class TensorBoardMirror:
    def __init__(self, cfg: RunConfig, purge_step: int | None = None):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary
        self.path = Path(cfg.tensorboard).expanduser() / cfg.run_id
        self.writer = SummaryWriter(str(self.path), purge_step=purge_step)
        if purge_step is None:
            for summary in hparams_summary(hparams(cfg), {}):
                self.writer.file_writer.add_summary(summary)

    def add_rows(self, rows: list[dict]) -> None:
        for r in rows:
            tag = row_tag(r)
            if tag is not None and isinstance(r.get("value"), (int, float)) and "step" in r:
                self.writer.add_scalar(tag, r["value"], global_step=int(r["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_mirror(cfg: RunConfig, resume_step: int | None) -> TensorBoardMirror | None:
    """The run's mirror, or None when ``cfg.tensorboard`` is empty (then nothing is imported)."""
    if not cfg.tensorboard:
        return None
    return TensorBoardMirror(cfg, None if resume_step is None else resume_step + 1)
