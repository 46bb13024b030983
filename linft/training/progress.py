"""What a run shows while it trains: one plain, flushed line per evaluation on **stdout** (step, lr,
mean training loss since the last evaluation, i.i.d. and o.o.d. accuracy, images per second), in
every context (a terminal, a sweep's log file, a Slurm job's log), and a tqdm bar on stderr only
when stderr is a terminal (its redraws never pile up in a log). stderr is left to errors, which stay
one line. ``quiet`` shows nothing.

i.i.d. accuracy: the mean over training domains of their held-out ``out`` split; o.o.d.: the mean
over test domains of their ``in`` split (DomainBed's test-domain accuracy). Both for the current
weights (``model == "current"``).
"""
from __future__ import annotations

import sys
import time

from linft.runs.config import RunConfig


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def eval_summary(rows: list[dict]) -> tuple[float | None, float | None]:
    """(i.i.d. acc, o.o.d. acc) of the current weights from one evaluation's rows."""
    acc = [r for r in rows if r.get("kind") == "eval" and r.get("model") == "current" and r.get("metric") == "acc"]
    iid = _mean([r["value"] for r in acc if r["role"] == "train" and r["split"] == "out"])
    ood = _mean([r["value"] for r in acc if r["role"] == "test" and r["split"] == "in"])
    return iid, ood


def format_eval_line(run_id: str, step: int, steps: int, lr: float, loss: float | None, iid: float | None,
                     ood: float | None, img_s: float | None, elapsed: float) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)
    return (f"{run_id} step {step}/{steps}  lr {lr:.2e}  train loss {num(loss, '.4f')}  iid acc {num(iid, '.4f')}  "
            f"ood acc {num(ood, '.4f')}  {num(img_s, '.0f')} img/s  {elapsed:.0f} s")


class RunProgress:
    """The bar (terminal only) and the per-evaluation lines of one run."""

    def __init__(self, cfg: RunConfig, start: int, stream=None, bar_stream=None):
        self.cfg = cfg
        self.stream = stream if stream is not None else sys.stdout
        bar_stream = bar_stream if bar_stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self.bar = None
        if not cfg.quiet and _isatty(bar_stream):
            from tqdm.auto import tqdm
            self.bar = tqdm(total=cfg.steps, initial=start, desc=cfg.run_id, unit="step", dynamic_ncols=True,
                            leave=False, file=bar_stream)

    def update(self, loss: float, lr: float, img_s: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", img_s=f"{img_s:.0f}", refresh=False)

    def evaluated(self, step: int, rows: list[dict], lr: float) -> None:
        if self.cfg.quiet:
            return
        loss = next((r["value"] for r in rows if r.get("kind") == "train" and r["metric"] == "loss"), None)
        img_s = next((r["value"] for r in rows if r.get("kind") == "train" and r["metric"] == "img_per_s"), None)
        line = format_eval_line(self.cfg.run_id, step, self.cfg.steps, lr, loss, *eval_summary(rows), img_s,
                                time.perf_counter() - self.t0)
        if self.bar is not None:
            self.bar.write(line, file=self.stream)  # clears and redraws the bar around the line
            self.stream.flush()
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
