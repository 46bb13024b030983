"""``trajectory``: how linear fine-tuning stays *along* training, from the weights a run kept at its
``snapshot_steps`` ([ZB] Sec. 3-4; paper_notes.md section 1). Where :mod:`linft.analysis.linearity`
only has the last checkpoint (and so walks the straight path theta0 + t (theta_ft - theta0)), this
reads the real trajectory theta_s, s = every snapshot step (sorted; the final weights as step
``steps`` when no snapshot is there), of ONE standard (non-linearized) run:

- ``weight_distance`` = ||theta_s - theta0||_2 over the trained parameters, ``weight_distance_relative``
  = that / ||theta0||_2 (``level="total"``; :func:`linft.core.params.weight_distance`);
- post-hoc Taylor fidelity at theta_s (``definition="posthoc"``): the run's first-order Taylor model
  around theta0, ``linearize(trainable, params0=theta0)``, against the network, both at theta_s, on at
  most ``max_examples`` examples of each eval split (a seeded subset, sorted; 0: all), per split and
  pooled -- the statistics of :func:`linft.core.fidelity.fidelity` (r2, agreement, rel_err_l2/_l1,
  residual_l2/_l1), rows as linearity's. At s = 0 the network has not moved: rel_err is fidelity's
  0/0 = 0 (or inf if the Taylor engine's primal differs from the forward in the last bit);
- ``kernel_distance`` 1 - <K0, K_s>_F / (|K0| |K_s|) between the empirical NTK at theta0 (computed
  once) and at theta_s, on the probe of :mod:`linft.analysis.ntk` (``probe_size`` examples of the
  training domains' out split, ``probe_seed``), in the tail + head parameters, form ``full``
  ([N, C, N, C], default) or ``trace`` ([N, N]); a full-form analysis also reports the distance of
  the traced kernels (``kernel_distance_trace``).

``steps`` restricts the points (e.g. the last step alone: the final weights' fidelity and kernel
distance on the same subset, for runs of a study compared across sizes); a run without snapshots
has its final weights only. Every row carries ``step``, ``form``, ``probe_size`` and
``definition="posthoc"``. A linearized run is
refused: its kernel is J(theta0) at every theta (the distance is 0 by construction) and its Taylor
model is the trained model itself. The analysis reads the raw trajectory, so it has no ``weights``
option (the trajectory average is not a point of the trajectory).
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from linft.analysis.loading import BN_POLICIES, LoadedRun, cat, group_keys
from linft.analysis.ntk import kernel_at, probe_batch
from linft.analysis.spec import COMMON_OPTIONS, Analysis, Option
from linft.core.fidelity import fidelity
from linft.core.linearize import linearize
from linft.core.ntk import kernel_distance, trace_form
from linft.core.params import weight_distance
from linft.errors import LinftError
from linft.runs.store import load_checkpoint, run_snapshots

Key = tuple[str, str]


def snapshot_files(run: LoadedRun) -> dict[int, object]:
    """Step -> snapshot file of ``run`` (:func:`linft.runs.store.run_snapshots` of its folder)."""
    return run_snapshots(run.path)


def trajectory_points(run: LoadedRun, steps: tuple[int, ...] = ()) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """(step, theta_s) for every snapshot step (only ``steps`` when given), sorted, + the final weights
    at ``cfg.steps`` if no snapshot is there (a run without snapshots: the final weights alone);
    theta_s holds the trained parameters (run.theta's names, dtype and device)."""
    if run.linear:
        raise LinftError(f"{run.id} is a linearized run (mode {run.cfg.mode}): its kernel is constant (J(theta0) "
                         "at every theta) and its Taylor model is the trained model; run trajectory on a standard run")
    files = {s: f for s, f in snapshot_files(run).items() if not steps or s in steps}
    if steps and set(steps) - set(files) - {run.cfg.steps}:
        raise LinftError(f"{run.id} has no snapshot at step(s) {sorted(set(steps) - set(files) - {run.cfg.steps})}; "
                         f"it has {sorted(snapshot_files(run))} and its final weights at {run.cfg.steps}")
    buffers = {n: t for n, t in run.trainable.state_dict().items() if n not in run.theta}
    points = []
    for step in sorted(files):
        state = load_checkpoint(files[step])["trainable"]
        missing = sorted(set(run.theta) - set(state))
        if missing:
            raise LinftError(f"snapshot {files[step].name} of {run.id} lacks trained parameter {missing[0]}")
        for n, t in buffers.items():
            if n in state and not torch.equal(state[n].to(t), t):
                raise LinftError(f"snapshot {files[step].name} of {run.id} has another {n} than the run "
                                 "(BatchNorm statistics must stay frozen)")
        points.append((step, {n: state[n].to(dtype=run.theta[n].dtype, device=run.theta[n].device)
                              for n in run.theta}))
    if run.cfg.steps not in files and (not steps or run.cfg.steps in steps):
        points.append((run.cfg.steps, run.theta))
    return points


def example_subset(run: LoadedRun, max_examples: int, seed: int) -> dict[Key, torch.Tensor]:
    """At most ``max_examples`` inputs of each eval split (0: all): a seeded permutation's first
    ones, in their original order; a split that small enough is kept whole."""
    feats, _ = run.features()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, zs in feats.items():
        x = torch.cat(zs)
        if max_examples and len(x) > max_examples:
            idx = torch.randperm(len(x), generator=g)[:max_examples].sort().values
            x = x[idx.to(x.device)]
        out[key] = x
    return out


@torch.no_grad()
def _logits(module, params: dict, xs: dict[Key, torch.Tensor], batch: int = 256) -> dict[Key, torch.Tensor]:
    return {k: torch.cat([functional_call(module, params, (x[i:i + batch],)).double().cpu()
                          for i in range(0, len(x), batch)]) for k, x in xs.items()}


def trajectory(runs, steps=(), max_examples=1000, subset_seed=0, form="full", probe_size=32, probe_seed=0,
               engine="jvp", method="auto", memory_bytes=2 ** 31, bn_policy="frozen"):
    run = runs[0]
    points = trajectory_points(run, tuple(steps))
    net = run.trainable
    lin = linearize(net, params0=run.theta0, engine=engine)
    lin.eval()
    xs = example_subset(run, max_examples, subset_seed)
    groups = group_keys(run)
    f0 = _logits(net, run.theta0, xs)
    px, _ = probe_batch(run, probe_size, probe_seed)
    k0 = kernel_at(run, run.theta0, px, form, method, memory_bytes)
    t0 = trace_form(k0) if form == "full" else k0
    rows = []
    for step, theta in points:
        common = dict(step=step, definition="posthoc", form=form, probe_size=len(px), endpoint_a="theta0",
                      endpoint_b=f"step:{step}", bn_policy=bn_policy)
        total = next(d for d in weight_distance(theta, run.theta0) if d["level"] == "total")
        rows += [dict(common, level="total", metric="weight_distance", value=total["distance"]),
                 dict(common, level="total", metric="weight_distance_relative", value=total["relative"])]
        f, g = _logits(net, theta, xs), _logits(lin, theta, xs)
        for fields, ks in groups:
            stats = fidelity(cat(f, ks), cat(g, ks), cat(f0, ks))
            rows += [dict(common, **fields, metric=k, value=v) for k, v in stats.items()]
        k1 = kernel_at(run, theta, px, form, method, memory_bytes)
        probe = dict(common, env="pooled", role="train", split="out")
        rows.append(dict(probe, metric="kernel_distance", value=kernel_distance(k0, k1)))
        if form == "full":
            rows.append(dict(probe, metric="kernel_distance_trace", value=kernel_distance(t0, trace_form(k1))))
    sizes = {f"{e}/{s}": len(x) for (e, s), x in xs.items()}
    return rows, {"steps": [s for s, _ in points], "snapshots": sorted(snapshot_files(run)),
                  "examples_per_split": sizes, "probe_size": len(px), "engine": engine, "definition": "posthoc"}


ANALYSIS = Analysis(
    "trajectory", trajectory, runs=(1, 1), common=False,
    help="along a run's snapshots: weight distance, post-hoc Taylor fidelity and NTK distance to theta0",
    options=tuple(o for o in COMMON_OPTIONS if o.name != "weights") + (
        Option("steps", (), "only these steps (snapshot steps, or the run's last step: its final weights); "
                            "empty: every snapshot and the final weights", item=int),
        Option("max_examples", 1000, "Taylor fidelity on at most this many examples per eval split (0: all)"),
        Option("subset_seed", 0, "seed of the examples kept per split"),
        Option("form", "full", "kernel form: full [N,C,N,C] or trace [N,N] (different numbers)",
               choices=("full", "trace")),
        Option("probe_size", 32, "NTK probe examples (training domains' out split)"),
        Option("probe_seed", 0, "seed of the NTK probe's permutation"),
        Option("engine", "jvp", "Taylor engine of the post-hoc linearization", choices=("jvp", "onepass"),
               semantic=False),
        Option("method", "auto", "how the kernel is computed", choices=("auto", "jacobian", "ntvp"),
               semantic=False),
        Option("memory_bytes", 2 ** 31, "memory budget of the kernel computation", semantic=False),
        Option("bn_policy", "frozen", "BatchNorm: the run's pre-trained statistics", choices=BN_POLICIES)),
    summary=("weight_distance_relative", "rel_err_l2", "agreement", "kernel_distance"), label=("form",),
    doc="trajectory: at every snapshot step s of a standard run, |theta_s - theta0| (relative), the post-hoc "
        "Taylor model vs the network at theta_s ('posthoc') and the NTK distance between theta0 and theta_s "
        "('form=full' [N,C,N,C] by default, or 'form=trace').")
