"""Model surgery: split a backbone into trunk | tail | head by module names ([ZB] Sec. 3: the head sits on the last residual block).

- trunk: stem + all residual blocks but the last k (frozen; its output may be cached),
- tail: the last k residual blocks (+ the "neck" after them, e.g. EfficientNet's conv_head/bn2),
- head: :class:`~linft.core.heads.DropoutHead` (pool -> dropout(p) -> new linear classifier).

``trunk -> tail -> head`` reproduces the original forward up to the replaced classifier. Surgery
never mutates the caller's model: every piece is a deep copy.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from linft.core.heads import DropoutHead
from linft.errors import ConfigError

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class Layout:
    """Where an architecture's pieces live, by dotted module name."""

    family: str
    stem: tuple[str, ...]     # run before the blocks, in order
    blocks: tuple[str, ...]   # every residual (or MBConv) block, in order
    neck: tuple[str, ...]     # after the blocks and before pooling (part of the tail)
    classifier: str           # the original classifier's name (replaced by the head)


def resnet_layout(model: nn.Module) -> Layout:
    """torchvision ResNets (and linft's TinyResNet): stem conv1/bn1/relu/maxpool, blocks layer1-4.*, fc."""
    names = dict(model.named_children())
    blocks = tuple(f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(model, f"layer{i}"))))
    stem = tuple(n for n in ("conv1", "bn1", "relu", "maxpool") if n in names)
    return Layout("resnet", stem, blocks, (), "fc")


def efficientnet_layout(model: nn.Module) -> Layout:
    """timm EfficientNets: stem conv_stem/bn1, blocks.<stage>.<i>, neck conv_head/bn2, classifier."""
    blocks = tuple(f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage)))
    return Layout("efficientnet", ("conv_stem", "bn1"), blocks, ("conv_head", "bn2"), "classifier")


# family -> (module names that identify it, layout function)
LAYOUTS = {
    "resnet": ({"conv1", "bn1", "layer1", "layer4", "fc"}, resnet_layout),
    "efficientnet": ({"conv_stem", "bn1", "blocks", "conv_head", "bn2", "classifier"}, efficientnet_layout),
}


def layout_of(model: nn.Module, family: str | None = None) -> Layout:
    """The layout of ``model``: of the named ``family`` (a key of :data:`LAYOUTS`, as a backbone
    registry entry declares it), else recognised by its module names."""
    names = set(dict(model.named_children()))
    for fam, (needed, layout) in LAYOUTS.items():
        if (family is None or fam == family) and needed <= names:
            return layout(model)
    raise ConfigError(f"cannot split a {type(model).__name__}" + (f" as a {family}" if family else "") +
                      ": linft knows torchvision ResNets and timm EfficientNets "
                      "(module names conv1/layer1-4/fc or conv_stem/blocks/conv_head)")


def _flat(name: str) -> str:
    return name.replace(".", "_")


@dataclass
class Split:
    """The three pieces of a split network; each is an independent copy of the original's modules."""

    trunk: nn.Sequential
    tail: nn.Sequential
    head: DropoutHead
    layout: Layout
    k: int

    def tail_head(self) -> nn.Sequential:
        """tail -> head as one module (the part that is trained / linearized), sharing the modules."""
        return nn.Sequential(self.tail, self.head)

    def full(self) -> nn.Sequential:
        """trunk -> tail -> head as one module, sharing the modules."""
        return nn.Sequential(self.trunk, self.tail, self.head)


def split_network(model: nn.Module, k: int, num_classes: int, p: float = 0.0,
                  head_init: str = "random", keep_classifier: bool = False, family: str | None = None) -> Split:
    """Split ``model`` into trunk | last ``k`` blocks (+ neck) | DropoutHead(p).

    ``k`` ranges over 0..number of blocks (ResNet50: 16 blocks, k=3 is layer4). The head is a new
    ``Linear(feature_dim, num_classes)`` initialised per ``head_init``; ``keep_classifier=True``
    copies the original classifier instead (then ``num_classes`` must match it), which lets a test
    check that the pieces reproduce the original forward. ``family`` names the layout (see
    :func:`layout_of`); without it the layout is recognised from the module names.
    """
    layout = layout_of(model, family)
    n = len(layout.blocks)
    if not isinstance(k, int) or not 0 <= k <= n:
        raise ConfigError(f"k must be an integer in [0, {n}] for {type(model).__name__} ({n} blocks), got {k!r}")
    mods = dict(model.named_modules())
    cut = n - k
    trunk = nn.Sequential(*[])
    for name in layout.stem + layout.blocks[:cut]:
        trunk.add_module(_flat(name), copy.deepcopy(mods[name]))
    tail = nn.Sequential()
    for name in layout.blocks[cut:] + layout.neck:
        tail.add_module(_flat(name), copy.deepcopy(mods[name]))
    classifier = mods[layout.classifier]
    head = DropoutHead(classifier.in_features, num_classes, p, init=head_init)
    if keep_classifier:
        if classifier.out_features != num_classes:
            raise ConfigError(f"keep_classifier needs num_classes={classifier.out_features}")
        head.fc.load_state_dict(classifier.state_dict())
    return Split(trunk, tail, head, layout, k)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Put every BatchNorm of ``module`` in eval mode for good: pre-trained running statistics are
    used and never updated (the paper's protocol, DomainBed's ``freeze_bn``), also after a later
    ``module.train()``. The affine parameters stay trainable. Returns ``module`` (modified in place).
    """
    for m in module.modules():
        if isinstance(m, _BN_TYPES):
            m.eval()
            m.train = _stay_eval.__get__(m)  # type: ignore[method-assign]
    return module


def _stay_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def batchnorm_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, _BN_TYPES)]


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def pooled_block_outputs(tail: nn.Sequential, h: torch.Tensor) -> list[torch.Tensor]:
    """Run ``tail`` on trunk features ``h`` [B, C, H, W]; return each child's output average-pooled,
    a list of [B, C_i] (the phi_i of the paper's Eq. 1)."""
    outs = []
    for child in tail:
        h = child(h)
        outs.append(h.mean(dim=(2, 3)))
    return outs
