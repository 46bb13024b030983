"""One run: build -> (probe the head) -> loop -> evaluate -> checkpoint -> rows. Resumable.

Randomness is a pure function of (seed, step): the loaders draw each step's examples and
augmentation seeds from generators keyed by (seed, domain, step), and the global torch RNG (dropout
masks) is saved in every checkpoint. A run killed at any moment therefore resumes from its last
checkpoint and ends bit-identical (on CPU) to an uninterrupted run; rows past the checkpoint are
dropped on resume, so none is duplicated or torn. A run without a checkpoint starts from scratch:
its ``results.jsonl`` is replaced by the step-0 rows (nothing of an earlier attempt is kept).

Divergence: a run is stopped and marked failed (rows kept, ``failed`` holding step and reason) at
the first step whose minibatch training loss is non-finite or exceeds
``min(DIVERGENCE_CAP, DIVERGENCE_FACTOR * max(initial loss, ln C))`` = ``min(1e6, 1e3 * max(L1, ln C))``,
with L1 the loss of the run's first step and ln C the cross-entropy of a uniform prediction over C
classes. A healthy cross-entropy stays within a few multiples of ln C; a thousand times it means
logit margins of thousands, i.e. an exploding run that would otherwise end "done" with garbage.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from linft.errors import LinftError
from linft.runs.config import RunConfig
from linft.runs.modes import get_mode
from linft.training.evaluate import TrajectoryAverage, TrajectoryEnsemble, channels_last, eval_rows, metrics, predict
from linft.training.pipeline import Pipeline, build_run, finalize_trainable, probe_head
from linft.training.progress import RunProgress
from linft.training.tensorboard import open_mirror, require_tensorboard
from linft.runs.store import RunDir, atomic_torch_save, load_checkpoint


DIVERGENCE_FACTOR = 1e3  # loss > this x max(first-step loss, ln C): diverged (module docstring)
DIVERGENCE_CAP = 1e6     # ... or > this, whatever the first loss


class RunFailed(Exception):
    """A run diverged (non-finite or exploding loss, module docstring); its rows are kept and it is
    marked failed."""


def divergence_limit(first_loss: float | None, num_classes: int) -> float:
    """The loss above which a run has diverged (module docstring)."""
    base = math.log(max(num_classes, 2))
    if first_loss is not None and math.isfinite(first_loss):
        base = max(base, first_loss)
    return min(DIVERGENCE_CAP, DIVERGENCE_FACTOR * base)


def divergence_reason(loss: float, step: int, first_loss: float | None, num_classes: int) -> str | None:
    """The reason a run has diverged at ``step`` with this training loss, or None (module docstring)."""
    if not math.isfinite(loss):
        return f"diverged: non-finite loss ({loss}) at step {step}"
    limit = divergence_limit(first_loss, num_classes)
    if loss > limit:
        return (f"diverged: loss {loss:.3g} at step {step} exceeds {limit:.3g} = min({DIVERGENCE_CAP:g}, "
                f"{DIVERGENCE_FACTOR:g} x max(first loss, ln C))")
    return None


def _optimizer(cfg: RunConfig, pipe: Pipeline, lr_scale: float = 1.0) -> torch.optim.SGD:
    head_ids = pipe.head_parameter_ids()
    params = [p for p in pipe.trainable.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": cfg.lr * lr_scale},
              {"params": [p for p in params if id(p) in head_ids], "lr": cfg.lr * lr_scale * cfg.last_layer_lr_mult}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class Trainer:
    """Holds one run's data, models and state; ``run()`` trains to the end (or resumes)."""

    def __init__(self, cfg: RunConfig, root: str | Path):
        self.cfg, self.run_dir = cfg, RunDir(root, cfg)
        built = build_run(cfg)
        self.device, self.data, self.pipe = built.device, built.data, built.pipe
        self.autocast = self.device.type == "cuda"
        self.avg = TrajectoryAverage(cfg.traj_start)
        self.ens = TrajectoryEnsemble(cfg.traj_start)
        self.primal = None  # lin_primal_cache: PrimalCache over the training examples
        self.tb = None      # tensorboard=DIR: every row is mirrored there as it is written
        if cfg.tensorboard:
            require_tensorboard()  # before any work: a missing package is one line, not a late crash
        self.first_loss: float | None = None  # training loss of step 1 (the divergence rule)

    def _attach_primal_cache(self) -> None:
        """Cache the primal stream at theta0 for every training example ("in" splits of the
        training domains, concatenated); steps then replay it (same examples, same dropout masks)."""
        import numpy as np

        from linft.core.tangent import build_primal_cache
        feats, labels, self._primal_rows = [], [], []
        offset = 0
        for s in self.data.splits:
            if s.role != "train":
                continue
            env = self.data.inputs[s.env]
            rows = np.full(len(env), -1, dtype=np.int64)
            rows[s.in_idx] = offset + np.arange(len(s.in_idx))
            offset += len(s.in_idx)
            self._primal_rows.append(torch.from_numpy(rows))
            feats.append(torch.from_numpy(np.asarray(env.features[s.in_idx], dtype=np.float32)))
            labels.append(torch.from_numpy(np.asarray(env.labels[s.in_idx], dtype=np.int64)))
        inputs = torch.cat(feats).to(self.device)
        self._primal_labels = torch.cat(labels).to(self.device)
        if self.device.type == "cuda":
            budget = 0.5 * torch.cuda.mem_get_info(self.device)[0]
        else:  # half the memory the OS calls available (Linux)
            budget = 0.5 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        from linft.errors import ConfigError, LinearizationError
        try:
            self.primal = build_primal_cache(self.pipe.trainable, inputs, max_bytes=budget)
        except LinearizationError as e:
            raise ConfigError(f"{e}: set lin_primal_cache=false (or use fewer examples)") from None

    def _primal_stream(self, start: int):
        for idx in self.data.train_index_batches(start, stream="train"):
            rows = torch.cat([r[i] for r, i in zip(self._primal_rows, idx)]).to(self.device)
            yield [(rows, self._primal_labels[rows])]

    # hooks a subclass overrides (linft.training.distributed.DistributedTrainer: one rank of several)
    _predict = staticmethod(predict)

    def _sync_grads(self) -> None:
        """After backward(): nothing in one process; the gradient all-reduce across ranks."""

    def _save_final(self, final: dict) -> None:
        atomic_torch_save(final, self.run_dir.final_path)

    def _append(self, rows: list[dict]) -> None:
        self.run_dir.append_rows(rows)
        if self.tb is not None:
            self.tb.add_rows(rows)

    def _drop_checkpoint(self) -> None:
        """After ``done``: final.pt is all a finished run needs (analyses read config.json + final.pt);
        the checkpoint (weights, momentum, average, ensemble) goes unless keep_checkpoint."""
        if not self.cfg.keep_checkpoint and self.run_dir.done:
            self.run_dir.checkpoint_path.unlink(missing_ok=True)

    # -- one optimisation step ---------------------------------------------------------------
    def _loss(self, module: nn.Module, batches) -> torch.Tensor:
        if self.primal is not None and module is self.pipe.trainable:  # batches: [(rows, y)]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                return F.cross_entropy(self.primal(batches[0][0]).float(), batches[0][1])
        x = torch.cat([b[0] for b in batches]).to(self.device, non_blocking=True)
        y = torch.cat([b[1] for b in batches]).to(self.device, non_blocking=True)
        x = channels_last(x)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            with torch.no_grad():
                z = self.pipe.post(self.pipe.pre(x))
            return F.cross_entropy(module(z).float(), y)

    # -- evaluation ----------------------------------------------------------------------------
    def _evaluate(self, step: int) -> list[dict]:
        run_id, rows = self.cfg.run_id, []
        current = {}
        for key, loader in self.data.eval_loaders.items():
            role = self.data.roles[key[0]]
            logits, labels = self._predict(self.pipe.pre, self.pipe.post, self.pipe.trainable, loader, self.device,
                                     autocast=self.autocast)
            current[key] = logits
            self.data.labels[key] = labels
            rows += eval_rows(run_id, step, "current", key, role, metrics(logits, labels))
            avg = self.avg.params(self.pipe.trainable)
            if avg is not None:
                lg, _ = self._predict(self.pipe.pre, self.pipe.post, self.pipe.trainable, loader, self.device, avg,
                                self.autocast)
                rows += eval_rows(run_id, step, "traj_avg", key, role, metrics(lg, labels))
        if self.ens.add(step, current):
            for key in current:
                rows += eval_rows(run_id, step, "traj_ens", key, self.data.roles[key[0]],
                                  metrics(self.ens.logits(key), self.data.labels[key]))
        return rows

    # -- checkpoints ---------------------------------------------------------------------------
    def _save(self, step: int, opt, sched, running: tuple[float, int] = (0.0, 0)) -> None:
        atomic_torch_save({"step": step, "running": list(running), "trainable": self.pipe.trainable.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                           "avg": self.avg.state_dict(), "ens": self.ens.state_dict(),
                           "first_loss": self.first_loss}, self.run_dir.checkpoint_path)

    def _restore(self, opt, sched) -> tuple[int, float, int]:
        path = self.run_dir.checkpoint_path
        try:
            ck = load_checkpoint(path)
            self.pipe.trainable.load_state_dict(ck["trainable"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            torch.set_rng_state(ck["rng"])
            self.avg.load_state_dict(ck["avg"])
            self.ens.load_state_dict(ck["ens"])
            step, running = int(ck["step"]), (float(ck["running"][0]), int(ck["running"][1]))
        except Exception as e:  # truncated/garbled zip, unpickling refused, keys or shapes of another run
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LinftError(f"{path} is damaged ({why[:200]}); delete it and launch the run again: it "
                             "restarts from step 0 (its rows are rewritten)") from None
        self.first_loss = ck.get("first_loss")
        self.run_dir.truncate_rows(step)
        return step, running[0], running[1]

    def _diverged(self, loss: float, step: int) -> str | None:
        return divergence_reason(loss, step, self.first_loss, self.data.num_classes)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> RunDir:
        cfg, rd = self.cfg, self.run_dir
        if rd.done:
            return rd
        rd.create()
        resuming = rd.checkpoint_path.exists()
        torch.manual_seed(cfg.seed)
        if cfg.head_init == "probe" and not resuming:
            probe_head(cfg, self.data, self.pipe, self.device)
        if get_mode(cfg.mode).calibrate and not resuming:
            first = next(self.data.train_batches(start=0, stream="calibrate"))
            with torch.no_grad():
                x = torch.cat([b[0] for b in first]).to(self.device)
                self.pipe.trainable.calibrate(self.pipe.post(self.pipe.pre(x)))
        finalize_trainable(self.pipe, cfg)
        self.pipe.trainable.train()
        opt = _optimizer(cfg, self.pipe)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.lr_decay_steps), cfg.lr_decay)
        step, running, n_loss = 0, 0.0, 0  # running: summed training loss since the last evaluation
        if resuming:
            step, running, n_loss = self._restore(opt, sched)
        if self._writes_rows():
            self.tb = open_mirror(cfg, step if resuming else None)
        progress = RunProgress(cfg, step)
        if not resuming:  # from scratch: no row of an earlier attempt survives (store module docstring)
            rd.failed and (rd.path / "failed").unlink()
            rows = self._evaluate(0)
            rd.write_rows(rows)
            if self.tb is not None:
                self.tb.add_rows(rows)
            progress.evaluated(0, rows, sched.get_last_lr()[0])
            self._save(0, opt, sched)
            if 0 in cfg.snapshot_steps and self._writes_rows():
                rd.save_snapshot(0, self.pipe.trainable.state_dict())
        if cfg.lin_primal_cache:
            self._attach_primal_cache()
            stream = self._primal_stream(step)
        else:
            stream = self.data.train_batches(start=step, stream="train")
        t0, n_img = time.perf_counter(), 0
        while step < cfg.steps:
            batches = next(stream)
            loss = self._loss(self.pipe.trainable, batches)
            if step == 0:
                self.first_loss = loss.item()
            reason = self._diverged(loss.item(), step + 1)
            if reason is not None:
                self._append([dict(run=cfg.run_id, kind="train", step=step + 1, metric="loss", value=loss.item())])
                rd.mark_failed(reason)
                progress.close()
                self._close_tb()
                raise RunFailed(f"{rd.path.name}: {reason}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            self._sync_grads()
            opt.step()
            sched.step()
            step += 1
            self.avg.update(step, self.pipe.trainable)
            running, n_loss, n_img = running + loss.item(), n_loss + 1, n_img + sum(len(b[1]) for b in batches)
            progress.update(loss.item(), sched.get_last_lr()[0], n_img / (time.perf_counter() - t0))
            if step in cfg.snapshot_steps and self._writes_rows():
                rd.save_snapshot(step, self.pipe.trainable.state_dict())
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rows = [dict(run=cfg.run_id, kind="train", step=step, metric="loss", value=running / n_loss),
                        dict(run=cfg.run_id, kind="train", step=step, metric="img_per_s",
                             value=n_img / (time.perf_counter() - t0))]
                rows += self._evaluate(step)
                self._append(rows)
                progress.evaluated(step, rows, sched.get_last_lr()[0])
                self._save(step, opt, sched)
                running, n_loss = 0.0, 0
            elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                self._save(step, opt, sched, (running, n_loss))
        progress.close()
        from linft.training.selection import selection_rows
        self._append(selection_rows(cfg, rd.read_rows()))
        final = {"trainable": self.pipe.trainable.state_dict()}
        if self.avg.mean is not None:
            final["traj_avg"] = self.avg.params(self.pipe.trainable)
        self._save_final(final)
        rd.mark_done()
        self._close_tb()
        self._drop_checkpoint()
        return rd

    def _writes_rows(self) -> bool:
        """Whether this process writes the run's rows (one process: yes; a rank of several: rank 0)."""
        return getattr(self, "rank", 0) == 0

    def _close_tb(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
