"""Run folders: atomic files, checkpoints, tidy JSONL rows, and the done / failed markers.

A run folder ``<root>/<run_id>/`` holds ``config.json``, ``results.jsonl`` (one tidy row per
measurement, DESIGN.md), ``checkpoint.pt`` (written atomically), ``final.pt``, and ``done`` or
``failed`` (with the reason). Rows are appended and fsynced line by line; on resume the rows past
the checkpoint's step are dropped, so a killed run never leaves duplicated or torn rows.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from linft.runs.config import RunConfig
from linft.errors import LinftError


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, _umask_mode())  # mkstemp creates 0600; results are meant to be shared
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, _umask_mode())
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict:
    """torch.load with weights_only=True (never unpickles arbitrary objects)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact, readable
    return v


class RunDir:
    """The folder of one run."""

    def __init__(self, root: str | os.PathLike, config: RunConfig):
        self.config = config
        self.path = Path(root) / config.run_id
        self.rows_path = self.path / "results.jsonl"
        self.checkpoint_path = self.path / "checkpoint.pt"
        self.final_path = self.path / "final.pt"

    # -- state ---------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return (self.path / "done").exists()

    @property
    def failed(self) -> str | None:
        f = self.path / "failed"
        return f.read_text() if f.exists() else None

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        cfg = self.path / "config.json"
        text = json.dumps(self.config.to_dict(), indent=2, sort_keys=True)
        if cfg.exists():
            stored = RunConfig.from_dict(json.loads(cfg.read_text()))
            if stored.semantic_diff() != self.config.semantic_diff():
                raise LinftError(f"{self.path} holds a run with another config")
        atomic_write_text(cfg, text + "\n")

    def mark_done(self) -> None:
        atomic_write_text(self.path / "done", "")
        (self.path / "failed").unlink(missing_ok=True)

    def mark_failed(self, reason: str) -> None:
        atomic_write_text(self.path / "failed", reason + "\n")

    # -- rows ----------------------------------------------------------------------------------
    def append_rows(self, rows: Iterable[dict]) -> None:
        lines = "".join(json.dumps({k: _clean(v) for k, v in r.items()}, sort_keys=True) + "\n" for r in rows)
        if not lines:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.rows_path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def read_rows(self) -> list[dict]:
        if not self.rows_path.exists():
            return []
        rows = []
        for line in self.rows_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a kill mid-write
        return rows

    def truncate_rows(self, last_step: int) -> None:
        """Keep the training rows up to ``last_step`` (the checkpoint's) and drop the rest."""
        rows = [r for r in self.read_rows() if r.get("step", -1) <= last_step and r.get("kind") in ("train", "eval")]
        atomic_write_text(self.rows_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def run_state(path: Path) -> str:
    """'done', 'failed', 'running' (has a checkpoint or rows) or 'new'."""
    if (path / "done").exists():
        return "done"
    if (path / "failed").exists():
        return "failed"
    if (path / "checkpoint.pt").exists() or (path / "results.jsonl").exists():
        return "running"
    return "new"
