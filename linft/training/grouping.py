"""Which runs of a grid can train together in one vectorised group (linft.training.group), and
whether K of them fit in memory."""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch

from linft.errors import ConfigError
from linft.runs.config import RunConfig

PER_MEMBER = ("seed", "p", "lr", "weight_decay", "last_layer_lr_mult")
NOT_SHARED = PER_MEMBER + ("quiet",)
VECTORISABLE_MODES = ("tail", "linear", "probe", "unfolded")


def group_key(cfg: RunConfig) -> tuple:
    """What members of one group share (everything but :data:`PER_MEMBER` and logging). A backbone
    with random weights is drawn from the seed, so its trunk features (the shared data) are too:
    then the seed is shared as well."""
    shared = tuple(set(NOT_SHARED) - {"seed"}) if seed_draws_trunk(cfg) else NOT_SHARED
    return tuple(sorted((k, str(v)) for k, v in cfg.to_dict().items() if k not in shared))


def seed_draws_trunk(cfg: RunConfig) -> bool:
    """True when the backbone's weights are a random init (drawn from the seed, not loaded)."""
    from linft.models.backbones import get_spec
    return get_spec(cfg.backbone).weights_file is None


def why_not_vectorisable(cfg: RunConfig) -> str | None:
    """None if ``cfg`` can train in a vectorised group, else the reason in words."""
    if cfg.mode not in VECTORISABLE_MODES:
        return f"mode {cfg.mode!r} trains the trunk (vectorised groups need cached trunk features)"
    if not cfg.feature_cache:
        return "feature_cache=false (vectorised groups read cached trunk features)"
    if cfg.lin_primal_cache:
        return "lin_primal_cache=true (its per-example cache is per run)"
    if cfg.tensorboard:
        return "tensorboard is set (the TensorBoard mirror is written by the single-run trainer)"
    return None


def make_groups(configs: list[RunConfig], k: int) -> tuple[list[list[RunConfig]], list[RunConfig]]:
    """``(groups of at most k vectorisable configs sharing group_key, configs to run alone)``."""
    by_key: dict[tuple, list[RunConfig]] = defaultdict(list)
    alone = []
    for c in configs:
        (alone.append(c) if why_not_vectorisable(c) else by_key[group_key(c)].append(c))
    groups = [g[i:i + k] for g in by_key.values() for i in range(0, len(g), k)]
    alone += [g[0] for g in groups if len(g) == 1]
    return [g for g in groups if len(g) > 1], alone


def available_bytes(device: torch.device) -> int:
    """Free memory: the GPU's (CUDA), else the OS's MemAvailable (Linux), else its free pages."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def member_bytes(built) -> int:
    """Memory one more member costs (estimate): its modules, the stacked copy, gradient and momentum
    (4x the trainable parameters), the trajectory average in float64 (2x), and the activations one
    training step saves for the backward (counted on one batch of zeros)."""
    cfg, pipe = built.cfg, built.pipe
    params = sum(p.numel() * p.element_size() for p in pipe.trainable.parameters())
    frozen = sum(t.numel() * t.element_size() for part in (pipe.split.trunk, pipe.post)
                 for t in part.state_dict().values())
    env = next(iter(built.data.inputs.values()))
    n_train = sum(1 for s in built.data.splits if s.role == "train")
    x = torch.zeros((cfg.batch_size * n_train, *env.features.shape[1:]), device=built.device,
                    dtype=next(pipe.trainable.parameters()).dtype)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t
    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.no_grad():
            z = pipe.post(x)
        out = pipe.trainable(z)  # the head (and a linearized tail) is still the plain module here
        del out
    return 6 * params + frozen + 2 * saved[0]


def check_memory(built, k: int) -> None:
    """Refuse a group of ``k`` members that would not fit in memory (one readable line)."""
    per, free = member_bytes(built), available_bytes(built.device)
    if k * per > 0.8 * free:
        fit = max(1, int(0.8 * free // per))
        raise ConfigError(f"--vectorize {k} needs about {k * per / 2**30:.2f} GiB ({per / 2**20:.0f} MiB per run) "
                          f"but {free / 2**30:.2f} GiB are free on {built.device}: use --vectorize {fit} or less")


