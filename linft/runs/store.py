"""The one run store: atomic files, checkpoints, tidy JSONL rows (:mod:`linft.runs.rows`), and the
done / failed markers of run folders and of their child folders (analyses, soups, trends).

A run folder ``<root>/<run_id>/`` holds ``config.json``, ``results.jsonl``, ``checkpoint.pt``
(written atomically), ``final.pt``, and ``done`` or ``failed`` (with the reason); children live in
``<run>/analyses/<kind>-<sha256[:12]>/{config.json, rows.jsonl, done}``.

One policy for a torn file: rows are appended and fsynced line by line, so a kill can leave only the
*last* line incomplete (no trailing newline); readers drop such a tail, and a run resumes from its
checkpoint, rewriting its rows up to the checkpoint's step. Any other unreadable line is damage, not
a kill: it is one :class:`~linft.errors.LinftError` naming file and line, never silently skipped.
A run that starts without a checkpoint starts from scratch: its ``results.jsonl`` is replaced by the
step-0 rows, whatever an earlier attempt left there.

One process at a time trains a run: it holds ``fcntl.flock`` on ``<run>/lock`` (:class:`RunLock`,
the file names the holder's pid, host and start time). The kernel drops the lock when its process
dies, however it dies, so a requeued or relaunched job takes over the run of a killed predecessor.

A write that fails (disk full, read-only folder) is one :class:`StoreWriteError` naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from linft.runs.config import RunConfig
from linft.runs.rows import clean
from linft.errors import LinftError


class StoreWriteError(LinftError):
    """A run-store file that cannot be written (disk full, read-only folder, no permission)."""


class RunLocked(LinftError):
    """Another process is training this run (it holds ``<run>/lock``)."""


@contextlib.contextmanager
def _writing(path: Path):
    """OSError while writing ``path`` -> one StoreWriteError naming it (never a traceback)."""
    try:
        yield
    except OSError as e:
        why = e.strerror or str(e)
        hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some quota",
                errno.EROFS: "the file system is read-only; choose another --root",
                errno.EACCES: "no permission; choose another --root",
                errno.EPERM: "no permission; choose another --root"}.get(e.errno, "")
        raise StoreWriteError(f"cannot write {path}: {why}" + (f" ({hint})" if hint else "") +
                              "; a run resumes from its last checkpoint when launched again") from None


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _writing(path):
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
    import torch  # here, not at the top: the command line reads run states without importing torch
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.fchmod(fd, _umask_mode())
        os.close(fd)
        try:
            try:
                torch.save(obj, tmp)
            except RuntimeError as e:  # torch's zip writer reports a failed write (disk full) this way
                raise OSError(errno.EIO, str(e).strip().splitlines()[-1]) from None
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_checkpoint(path: Path) -> dict:
    """torch.load with weights_only=True (never unpickles arbitrary objects)."""
    import torch
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
    with _writing(path):
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


def read_run_config(folder: str | os.PathLike) -> RunConfig:
    """The config of the run folder ``folder``; one LinftError when ``config.json`` is missing,
    damaged, or no longer describes the run of this folder (edited by hand: its run id is not the
    folder's name, so its rows would be collected under labels they were not trained with)."""
    folder = Path(folder)
    path = folder / "config.json"
    try:
        cfg = RunConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise LinftError(f"{path} is missing") from None
    except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError, ConfigError, EIO
        raise LinftError(f"{path} is damaged ({str(e).splitlines()[0]}); restore it, or delete the run "
                         "folder and train the run again") from None
    if cfg.run_id != folder.name:
        raise LinftError(f"{path} was edited: it describes run {cfg.run_id}, not {folder.name} (the run "
                         "these rows were trained with); restore the original config.json")
    return cfg


class RunLock:
    """``fcntl.flock`` on ``<run>/lock``: one process trains a run at a time. The file holds the
    holder's ``pid``, ``host`` and start ``time`` so that a refused process can say who has it.
    Released on :meth:`release` or when the holder dies (the kernel drops it)."""

    def __init__(self, run_path: str | os.PathLike):
        self.path = Path(run_path) / "lock"
        self.fd: int | None = None

    def acquire(self, wait_s: float = 1.0) -> "RunLock":
        """Take the lock, retrying for ``wait_s`` seconds; else :class:`RunLocked` naming the holder."""
        with _writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _umask_mode())
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    holder = lock_holder(self.path.parent) or "another process"
                    raise RunLocked(f"{self.path.parent} is being trained by {holder}; wait for it to finish "
                                    "or stop it (a killed holder releases the lock at once)") from None
                time.sleep(0.05)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (info + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(run_path: str | os.PathLike) -> str | None:
    """'pid P on HOST since TIME' when a live process holds ``<run>/lock``, else None."""
    path = Path(run_path) / "lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                h = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
                return f"pid {h['pid']} on {h['host']} since {h['time']}"
            except (ValueError, KeyError):
                return "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def run_snapshots(folder: str | os.PathLike) -> dict[int, Path]:
    """Step -> snapshot file (``snapshots/step_<N>.pt``) of the run folder ``folder`` (any name)."""
    return {int(f.stem.split("_")[1]): f for f in sorted((Path(folder) / "snapshots").glob("step_*.pt"))}


class RunDir:
    """The folder of one run."""

    def __init__(self, root: str | os.PathLike, config: RunConfig):
        self.config = config
        self.path = Path(root) / config.run_id
        self.rows_path = self.path / "results.jsonl"
        self.checkpoint_path = self.path / "checkpoint.pt"
        self.final_path = self.path / "final.pt"
        self.snapshot_dir = self.path / "snapshots"

    def snapshot_path(self, step: int) -> Path:
        """Where the trainable weights at ``step`` go (``config.snapshot_steps``)."""
        return self.snapshot_dir / f"step_{step:06d}.pt"

    def save_snapshot(self, step: int, state: dict) -> None:
        """The trainable part's state dict at ``step``, atomically (a resumed run rewrites it equal)."""
        self.snapshot_dir.mkdir(exist_ok=True)
        atomic_torch_save({"step": step, "trainable": state}, self.snapshot_path(step))

    def snapshots(self) -> dict[int, Path]:
        """Step -> snapshot file, for the snapshots this run has written."""
        return run_snapshots(self.path)

    # -- state ---------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return (self.path / "done").exists()

    @property
    def failed(self) -> str | None:
        f = self.path / "failed"
        return f.read_text() if f.exists() else None

    def lock(self, wait_s: float = 1.0) -> RunLock:
        """Hold the run (``with rd.lock(): ...``); :class:`RunLocked` if another process does."""
        return RunLock(self.path).acquire(wait_s)

    def create(self) -> None:
        cfg = self.path / "config.json"
        text = json.dumps(self.config.to_dict(), indent=2, sort_keys=True)
        if cfg.exists():
            stored = read_run_config(self.path)
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

    def write_rows(self, rows: Iterable[dict]) -> None:
        """Replace every row (a run that starts from scratch: none of an earlier attempt survives)."""
        write_jsonl(self.rows_path, rows)

    def read_rows(self) -> list[dict]:
        return read_jsonl(self.rows_path)

    def truncate_rows(self, last_step: int) -> None:
        """Keep the training rows up to ``last_step`` (the checkpoint's) and drop the rest; a row
        written twice by earlier attempts (same fields but the value) is kept once, the latest."""
        try:
            rows = self.read_rows()
        except LinftError as e:
            raise LinftError(f"{e}; fix or delete that line to resume, or delete {self.checkpoint_path} "
                             "to train the run again from step 0") from None
        kept, seen = [], set()
        for r in reversed(rows):
            if r.get("kind") not in ("train", "eval") or not isinstance(r.get("step"), int) or r["step"] > last_step:
                continue
            key = json.dumps({k: v for k, v in r.items() if k != "value"}, sort_keys=True)
            if key not in seen:
                seen.add(key)
                kept.append(r)
        write_jsonl(self.rows_path, reversed(kept))


def run_state(path: Path) -> str:
    """'done', 'running' (a process holds its lock, or it has a checkpoint or rows: interrupted),
    'failed' or 'new'."""
    if (path / "done").exists():
        return "done"
    if lock_holder(path):
        return "running"
    if (path / "failed").exists():
        return "failed"
    if (path / "checkpoint.pt").exists() or (path / "results.jsonl").exists():
        return "running"
    return "new"
