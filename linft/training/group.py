"""K runs of one grid trained together: one vectorised step for all members, one run folder each.

Members share everything but ``seed``, ``p``, ``lr``, ``weight_decay`` and ``last_layer_lr_mult``
(:func:`group_key`): the data, split, backbone, tail, mode, steps and schedule shape. Each member is
set up exactly as :class:`~linft.training.trainer.Trainer` sets up one run (``build_pipeline``, then
``torch.manual_seed(seed)``, the LP-FT head probe, calibration, ``finalize_trainable``, the trainer's
optimizer and MultiStepLR), so theta0 is the run's own; then the trainable parameters of all members
are stacked and one ``torch.func.vmap`` step (:class:`~linft.training.multirun.StackedForward`)
computes every member's loss and gradient; each member's own ``torch.optim.SGD`` (whose parameters
are views of the stacked tensors) applies its update, as in the run alone.

Randomness replays each single run: the data order comes from the member's own index stream (keyed
by its seed; members with one seed share the batch, and the primal stream of a linearized tail at
theta0 is then computed once), and the dropout masks are drawn by ``F.dropout`` from the member's own
copy of the global RNG state ([ZB] Sec. 3 head: one mask per example and unit). Rows, checkpoints
(the single run's format, the member's RNG state as ``rng``), ``final.pt`` and ``done`` are written
per member at the steps a single run writes them: a member can be resumed by either trainer, and a
killed group resumes where each member's checkpoint stands. A member whose loss is not finite is
marked failed at that step; the others go on.
"""
from __future__ import annotations

import copy
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from linft.errors import ConfigError
from linft.runs.config import RunConfig
from linft.runs.modes import get_mode
from linft.runs.store import RunDir, atomic_torch_save, load_checkpoint
from linft.training.evaluate import TrajectoryAverage, TrajectoryEnsemble, channels_last, eval_rows, metrics
from linft.training.grouping import PER_MEMBER, check_memory, group_key, why_not_vectorisable
from linft.training.multirun import StackedForward, replay_dropout_mask
from linft.training.pipeline import build_pipeline, build_run, finalize_trainable, probe_head
from linft.training.selection import selection_rows
from linft.training.progress import RunProgress
from linft.training.trainer import _optimizer, divergence_reason

def _same_trunk(a: nn.Module, b: nn.Module, cfg: RunConfig) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or not all(torch.equal(sa[n], sb[n]) for n in sa):
        raise ConfigError(f"run {cfg.run_id}: its trunk differs from the group's first run, so the cached "
                          "features are not shared; it cannot join this vectorised group")


def _probe_once(cfg: RunConfig, data, pipe, device, probes: dict) -> None:
    """LP-FT's probe, trained once per distinct probe: members that differ only in p, lr (with
    probe_lr set), ... and start from the same head get the probed head (and RNG state) of the first
    one, which :func:`probe_head` would reproduce bit for bit (it reads only these settings)."""
    key = (cfg.seed, cfg.probe_lr or cfg.lr * 10, cfg.weight_decay, cfg.momentum, cfg.probe_steps,
           cfg.p if cfg.probe_dropout else None)
    start = {n: t.detach().clone() for n, t in pipe.head.state_dict().items()}
    hit = probes.get(key)
    if hit is not None and all(torch.equal(start[n], t) for n, t in hit[0].items()):
        pipe.head.load_state_dict(hit[1])
        torch.set_rng_state(hit[2])
        return
    probe_head(cfg, data, pipe, device)
    probes[key] = (start, {n: t.detach().clone() for n, t in pipe.head.state_dict().items()}, torch.get_rng_state())


class _Member:
    """One run inside a group: its folder, modules, optimizer, schedule, RNG state, baselines."""

    def __init__(self, cfg: RunConfig, root, data, pipe, device, probes: dict | None = None):
        self.cfg, self.rd, self.data, self.pipe = cfg, RunDir(root, cfg), copy.copy(data), pipe
        self.data.cfg = cfg  # the member's streams are keyed by its own seed
        self.avg, self.ens = TrajectoryAverage(cfg.traj_start), TrajectoryEnsemble(cfg.traj_start)
        self.rd.create()
        resuming = self.rd.checkpoint_path.exists()
        torch.manual_seed(cfg.seed)  # as Trainer.run: then the head probe and the dropout masks draw from it
        if cfg.head_init == "probe" and not resuming:
            _probe_once(cfg, self.data, pipe, device, {} if probes is None else probes)
        if get_mode(cfg.mode).calibrate and not resuming:
            first = next(self.data.train_batches(start=0, stream="calibrate"))
            with torch.no_grad():
                x = torch.cat([b[0] for b in first]).to(device)
                pipe.trainable.calibrate(pipe.post(pipe.pre(x)))
        finalize_trainable(pipe, cfg)
        pipe.trainable.train()
        self.opt = _optimizer(cfg, pipe)
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, list(cfg.lr_decay_steps), cfg.lr_decay)
        self.step, self.running, self.n_loss, self.fresh = 0, 0.0, 0, not resuming
        self.first_loss: float | None = None  # the divergence rule's reference (as the single trainer)
        if resuming:
            ck = load_checkpoint(self.rd.checkpoint_path)
            pipe.trainable.load_state_dict(ck["trainable"])
            self.opt.load_state_dict(ck["optimizer"])
            self.sched.load_state_dict(ck["scheduler"])
            self.rng = ck["rng"]
            self.avg.load_state_dict(ck["avg"])
            self.ens.load_state_dict(ck["ens"])
            self.rd.truncate_rows(ck["step"])
            self.first_loss = ck.get("first_loss")
            self.step, self.running, self.n_loss = ck["step"], float(ck["running"][0]), int(ck["running"][1])
        else:
            self.rng = torch.get_rng_state()
            self.rd.failed and (self.rd.path / "failed").unlink()
            self.rd.write_rows([])  # from scratch: no row of an earlier attempt survives
        self.params = {n: p for n, p in pipe.trainable.named_parameters() if p.requires_grad}
        self.progress = RunProgress(cfg, self.step)  # one line per evaluation, as a single run prints

    def save(self) -> None:
        sd = {n: t.clone() for n, t in self.pipe.trainable.state_dict().items()}  # not views of the stack
        atomic_torch_save({"step": self.step, "running": [self.running, self.n_loss], "trainable": sd,
                           "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                           "rng": self.rng, "avg": self.avg.state_dict(), "ens": self.ens.state_dict(),
                           "first_loss": self.first_loss},
                          self.rd.checkpoint_path)

    def snapshot(self, step: int) -> None:
        """The member's weights at ``step`` when it is one of its snapshot steps (as the single trainer)."""
        if step in self.cfg.snapshot_steps:
            self.rd.save_snapshot(step, {n: t.clone() for n, t in self.pipe.trainable.state_dict().items()})

    def finish(self) -> None:
        self.rd.append_rows(selection_rows(self.cfg, self.rd.read_rows()))
        final = {"trainable": {n: t.clone() for n, t in self.pipe.trainable.state_dict().items()}}
        if self.avg.mean is not None:
            final["traj_avg"] = self.avg.params(self.pipe.trainable)
        atomic_torch_save(final, self.rd.final_path)
        self.progress.close()
        self.rd.mark_done()
        if not self.cfg.keep_checkpoint:  # final.pt is all a finished run needs (as the single trainer)
            self.rd.checkpoint_path.unlink(missing_ok=True)


class GroupTrainer:
    """Train (or resume) the runs ``configs`` (one group, :func:`group_key`) under ``root``."""

    def __init__(self, configs: list[RunConfig], root: str | Path):
        if not configs:
            raise ConfigError("a group needs at least one run")
        keys = {group_key(c) for c in configs}
        if len(keys) > 1:
            raise ConfigError(f"runs of one vectorised group may differ only in {', '.join(PER_MEMBER)}")
        reason = why_not_vectorisable(configs[0])
        if reason:
            raise ConfigError(f"cannot vectorise: {reason}")
        self.configs, self.root = list(configs), Path(root)

    def run(self) -> list[RunDir]:
        """Each member's config is checked and its lock held (one process per run, as
        :func:`linft.training.launch.train`); members already done are left alone."""
        import contextlib

        from linft.runs.store import read_run_config
        from linft.training.launch import check_device
        for c in self.configs:
            if (RunDir(self.root, c).path / "config.json").exists():
                read_run_config(RunDir(self.root, c).path)  # a damaged or hand-edited config.json
        check_device(self.configs[0].device)
        with contextlib.ExitStack() as locks:
            for c in self.configs:
                locks.enter_context(RunDir(self.root, c).lock())
            todo = [c for c in self.configs if not RunDir(self.root, c).done]
            try:
                if todo:
                    with torch.random.fork_rng(devices=[]):
                        self._train(todo)
            except BaseException:  # refused before any work (e.g. too large a group): leave nothing behind
                for c in todo:
                    path = RunDir(self.root, c).path
                    if path.is_dir() and set(os.listdir(path)) <= {"lock"}:
                        shutil.rmtree(path, ignore_errors=True)
                raise
        return [RunDir(self.root, c) for c in self.configs]

    # -- setup ---------------------------------------------------------------------------------
    def _train(self, configs: list[RunConfig]) -> None:
        built = build_run(configs[0])
        self.device, self.data = built.device, built.data
        check_memory(built, len(configs))
        members, probes = [], {}
        for i, cfg in enumerate(configs):
            if i == 0:
                pipe = built.pipe
            else:
                pipe = build_pipeline(cfg, self.data.num_classes, self.device)
                for part in (pipe.pre, pipe.post, pipe.trainable):
                    part.to(memory_format=torch.channels_last)
                _same_trunk(built.pipe.split.trunk, pipe.split.trunk, cfg)
                _same_trunk(built.pipe.post, pipe.post, cfg)
                pipe.pre = nn.Identity()  # the feature cache (RunData.attach) replaces the trunk
            members.append(_Member(cfg, self.root, self.data, pipe, self.device, probes))
        by_step: dict[int, list[_Member]] = defaultdict(list)  # a killed group: members may stand apart
        for m in members:
            by_step[m.step].append(m)
        for step in sorted(by_step):
            self._loop(by_step[step])

    def _stack(self, members: list[_Member]) -> None:
        """Stack the members' trainable parameters; each member's parameter becomes a view of its row."""
        self.members = members
        self.store = {n: torch.stack([m.params[n].detach() for m in members]) for n in members[0].params}
        for k, m in enumerate(members):
            for n, p in m.params.items():
                p.data = self.store[n][k]
        self.fwd = StackedForward([m.pipe.trainable for m in members], list(self.store),
                                  any(m.cfg.p > 0 for m in members))
        self.dtype = next(iter(self.store.values())).dtype
        self.post = members[0].pipe.post  # frozen and the same for all (checked): run once per example

    @torch.no_grad()
    def _post(self, x: torch.Tensor, batched: bool) -> torch.Tensor:
        if isinstance(self.post, nn.Identity):
            return x
        if not batched:
            return self.post(x)
        z = self.post(channels_last(x.flatten(0, 1)))
        return z.view(*x.shape[:2], *z.shape[1:])

    # -- data ----------------------------------------------------------------------------------
    def _streams(self, start: int):
        seeds = sorted({m.cfg.seed for m in self.members})
        its = {s: next(m for m in self.members if m.cfg.seed == s).data.train_index_batches(start, "train")
               for s in seeds}
        envs = [self.data.inputs[s.env] for s in self.data.splits if s.role == "train"]
        while True:
            batch = {}
            for s, it in its.items():
                idx = next(it)
                x = np.concatenate([np.asarray(e.features[i.numpy()], dtype=np.float32) for e, i in zip(envs, idx)])
                y = np.concatenate([np.asarray(e.labels[i.numpy()], dtype=np.int64) for e, i in zip(envs, idx)])
                batch[s] = (torch.from_numpy(x), torch.from_numpy(y))
            yield batch

    def _batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if len({m.cfg.seed for m in self.members}) == 1:
            x, y = batch[self.members[0].cfg.seed]
            return channels_last(x.to(self.device, self.dtype)), y.to(self.device), False
        x = torch.stack([batch[m.cfg.seed][0] for m in self.members]).to(self.device, self.dtype)
        y = torch.stack([batch[m.cfg.seed][1] for m in self.members]).to(self.device)
        return x, y, True

    def _masks(self, n: int) -> torch.Tensor | None:
        if not any(m.cfg.p > 0 for m in self.members):
            return None
        d = self.members[0].pipe.head.fc.in_features
        out = []
        for m in self.members:
            if m.cfg.p > 0:
                mask, m.rng = replay_dropout_mask(m.rng, m.cfg.p, (n, d), self.dtype, self.device)
            else:
                mask = torch.ones((n, d), dtype=self.dtype, device=self.device)
            out.append(mask)
        return torch.stack(out)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def _logits(self, params: dict, loader) -> tuple[torch.Tensor, torch.Tensor]:
        self.fwd.template.eval()
        outs, labels = [], []
        try:
            for x, y in loader:
                x = channels_last(x.to(self.device, self.dtype))
                outs.append(self.fwd(params, self._post(x, False), False).double().cpu())
                labels.append(y.cpu())
        finally:
            self.fwd.template.train()
        return torch.cat(outs, 1), torch.cat(labels)

    def _evaluate(self, step: int) -> dict[int, list[dict]]:
        rows: dict[int, list[dict]] = defaultdict(list)
        current: dict[int, dict] = defaultdict(dict)
        avgs = [m.avg.params(m.pipe.trainable) for m in self.members]
        avg = None if avgs[0] is None else {n: torch.stack([a[n] for a in avgs]) for n in self.store}
        for key, loader in self.data.eval_loaders.items():
            role = self.data.roles[key[0]]
            logits, labels = self._logits(self.store, loader)
            alogits = self._logits(avg, loader)[0] if avg is not None else None
            for k, m in enumerate(self.members):
                current[k][key] = logits[k]
                rows[k] += eval_rows(m.cfg.run_id, step, "current", key, role, metrics(logits[k], labels))
                if alogits is not None:
                    rows[k] += eval_rows(m.cfg.run_id, step, "traj_avg", key, role, metrics(alogits[k], labels))
            self.data.labels[key] = labels
        for k, m in enumerate(self.members):
            if m.ens.add(step, current[k]):
                for key in current[k]:
                    rows[k] += eval_rows(m.cfg.run_id, step, "traj_ens", key, self.data.roles[key[0]],
                                         metrics(m.ens.logits(key), self.data.labels[key]))
        return rows

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self, members: list[_Member]) -> None:
        self._stack(members)
        cfg0 = members[0].cfg
        step = members[0].step
        if any(m.fresh for m in members):  # fresh members: the step-0 evaluation (resumed ones have it)
            rows = self._evaluate(0)
            for k, m in enumerate(self.members):
                if m.fresh:
                    m.rd.append_rows(rows[k])
                    m.save()
                    m.progress.evaluated(0, rows[k], m.sched.get_last_lr()[0])
                    m.snapshot(0)
        stream = self._streams(step)
        t0, n_img = time.perf_counter(), 0
        while step < cfg0.steps and self.members:
            x, y, batched = self._batch(next(stream))
            masks = self._masks(y.shape[-1])
            leaves = {n: t.detach().requires_grad_(True) for n, t in self.store.items()}
            logits = self.fwd(leaves, self._post(x, batched), batched, masks).float()
            # the trainer's loss, member by member (the same kernel on the same float32 logits)
            losses = torch.stack([F.cross_entropy(lg, y[k] if batched else y) for k, lg in enumerate(logits)])
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
            values = losses.tolist()
            for m, v in zip(self.members, values):
                if step == 0:
                    m.first_loss = v
            reasons = [divergence_reason(v, step + 1, m.first_loss, self.data.num_classes)
                       for m, v in zip(self.members, values)]
            bad = [k for k, r in enumerate(reasons) if r is not None]
            for k, (m, v) in enumerate(zip(self.members, values)):
                if k in bad:
                    continue
                for (n, p), g in zip(m.params.items(), grads):
                    p.grad = g[k]
                m.opt.step()
                m.sched.step()
                m.opt.zero_grad(set_to_none=True)
                m.step = step + 1
                m.avg.update(m.step, m.pipe.trainable)
                m.running, m.n_loss = m.running + v, m.n_loss + 1
                m.snapshot(m.step)
            step += 1
            n_img += y.shape[-1]
            if bad:
                self._drop(bad, values, reasons, step)
                if not self.members:
                    return
            if step % cfg0.eval_every == 0 or step == cfg0.steps:
                rate = n_img / (time.perf_counter() - t0)
                rows = self._evaluate(step)
                for k, m in enumerate(self.members):
                    m.rd.append_rows([dict(run=m.cfg.run_id, kind="train", step=step, metric="loss",
                                           value=m.running / m.n_loss),
                                      dict(run=m.cfg.run_id, kind="train", step=step, metric="img_per_s",
                                           value=rate)] + rows[k])
                    m.running, m.n_loss = 0.0, 0
                    m.save()
                    m.progress.evaluated(step, rows[k], m.sched.get_last_lr()[0])
            elif cfg0.checkpoint_every and step % cfg0.checkpoint_every == 0:
                for m in self.members:
                    m.save()
        for m in self.members:
            m.finish()

    def _drop(self, bad: list[int], values: list[float], reasons: list, step: int) -> None:
        """Mark the members ``bad`` failed at ``step`` (as a single run would) and go on without them."""
        keep = []
        for k, m in enumerate(self.members):
            if k in bad:
                reason = reasons[k]
                m.rd.append_rows([dict(run=m.cfg.run_id, kind="train", step=step, metric="loss", value=values[k])])
                m.rd.mark_failed(reason)
            else:
                keep.append(m)
        if keep:
            self._stack(keep)
        else:
            self.members = []


def train_group(configs: list[RunConfig], root: str | Path) -> list[RunDir]:
    """Train the runs of one vectorised group (see the module docstring)."""
    return GroupTrainer(configs, root).run()


def _main(argv=None) -> int:  # python -m linft.training.group CONFIGS.json ROOT (the sweep launcher)
    import json
    import sys
    from linft.errors import LinftError
    args = sys.argv[1:] if argv is None else argv
    try:
        configs = [RunConfig.from_dict(d) for d in json.loads(Path(args[0]).read_text())]
        dirs = train_group(configs, args[1])
    except LinftError as e:
        print(f"linft: error: {e}", file=sys.stderr)
        return 2
    for d in dirs:
        print(f"{d.path.name}: {'done' if d.done else 'failed: ' + (d.failed or '').strip()}")
    return 0 if all(d.done for d in dirs) else 1


if __name__ == "__main__":
    raise SystemExit(_main())
