"""The one run store: atomic files, checkpoints, tidy JSONL rows (:mod:`linft.runs.rows`), and the
done / failed markers of run folders and of their child folders (analyses, soups, trends).

A run folder ``<root>/<run_id>/`` holds ``config.json``, ``results.jsonl``, ``checkpoint.pt``
(written atomically), ``final.pt``, and ``done`` or ``failed`` (with the reason); children live in
``<run>/analyses/<kind>-<sha256[:12]>/{config.json, rows.jsonl, done}``.

One policy for a torn file: rows are appended and fsynced line by line, so a kill can leave only the
*last* line incomplete (no trailing newline); readers drop such a tail, and a run resumes from its
checkpoint, rewriting its rows up to the checkpoint's step. Any other unreadable line is damage, not
a kill: it is one :class:`~linft.errors.LinftError` naming file and line, never silently skipped.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from linft.runs.config import RunConfig
from linft.runs.rows import clean
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


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file (the store's one torn-tail policy, module docstring); [] if missing."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):  # the last line, without its newline: a write cut short by a kill
                break
            raise LinftError(f"{path}:{i}: damaged row (not JSON); the file was edited or corrupted") from None
    return rows


def _lines(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(clean(r), sort_keys=True) + "\n" for r in rows)


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append rows and fsync (a kill can tear only the last line)."""
    lines = _lines(rows)
    if not lines:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Replace the file with ``rows``, atomically."""
    atomic_write_text(path, _lines(rows))


class ChildDir:
    """A done-marked child folder of a run (an analysis, a soup, a trend): ``config.json`` (what
    produced the rows: kind, member runs, options), ``rows.jsonl``, then ``done``, written in that
    order so that a folder with ``done`` is complete and is read back, never recomputed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def done(self) -> bool:
        return (self.path / "done").exists()

    def read_rows(self) -> list[dict]:
        return read_jsonl(self.path / "rows.jsonl")

    def read_config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def write(self, config: dict, rows: list[dict]) -> None:
        atomic_write_text(self.path / "config.json", json.dumps(config, indent=1, sort_keys=True, default=str) + "\n")
        write_jsonl(self.path / "rows.jsonl", rows)
        atomic_write_text(self.path / "done", "")


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
        append_jsonl(self.rows_path, rows)

    def read_rows(self) -> list[dict]:
        return read_jsonl(self.rows_path)

    def truncate_rows(self, last_step: int) -> None:
        """Keep the training rows up to ``last_step`` (the checkpoint's) and drop the rest."""
        rows = [r for r in self.read_rows() if r.get("step", -1) <= last_step and r.get("kind") in ("train", "eval")]
        write_jsonl(self.rows_path, rows)


def run_state(path: Path) -> str:
    """'done', 'failed', 'running' (has a checkpoint or rows) or 'new'."""
    if (path / "done").exists():
        return "done"
    if (path / "failed").exists():
        return "failed"
    if (path / "checkpoint.pt").exists() or (path / "results.jsonl").exists():
        return "running"
    return "new"
