"""The uniform dataset interface: a :class:`MultiDomainDataset` is a list of :class:`Environment`.

An environment (a domain) is an indexable set of labelled images. Image-folder domains keep
``(path, label)`` samples and decode on demand; in-memory domains (MNIST-derived) keep one uint8
tensor. Either way ``load(i)`` returns the raw image (a PIL image or a uint8 ``[C, H, W]`` tensor)
and ``labels`` is an int64 array; transforms (:mod:`linft.data.transforms`) take it from there.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from linft.data.errors import CorruptImageError, DataError

# torchvision's ImageFolder extensions, compared case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully and return it as RGB; a truncated or non-image file raises
    :class:`CorruptImageError` naming the file (we never set PIL's LOAD_TRUNCATED_IMAGES, which
    DomainBed sets globally and which silently pads truncated JPEGs with grey)."""
    try:
        with Image.open(path) as im:
            im.load()  # full decode: Image.open alone only reads the header
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"cannot read image {path}: {e}") from e


class Environment:
    """One domain: ``name``, ``labels`` (int64 ``[N]``), ``__len__``, ``load(i)``."""

    name: str
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short content hash that does not depend on where the data live (caches key on it)."""
        raise NotImplementedError  # pragma: no cover

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n={len(self)})"


class FolderEnvironment(Environment):
    """A domain stored as ``<folder>/<class>/<image>``; ``samples`` is a list of ``(path, label)``.

    With ``skip_corrupt=True`` every image is decoded once here and unreadable ones are dropped
    (``skipped`` lists them) so that indices and splits only ever see readable files; by default
    nothing is decoded up front and a bad file fails when first loaded, naming it.
    """

    def __init__(self, name: str, folder: Path, samples: list[tuple[Path, int]], skip_corrupt: bool = False):
        self.name = name
        self.folder = Path(folder)
        self.skipped: list[Path] = []
        if skip_corrupt:
            kept = []
            for path, label in samples:
                try:
                    load_image(path)
                    kept.append((path, label))
                except CorruptImageError:
                    self.skipped.append(path)
            samples = kept
        self.samples = list(samples)
        self.labels = np.asarray([lab for _, lab in self.samples], dtype=np.int64)

    def load(self, i: int) -> Image.Image:
        return load_image(self.samples[i][0])

    def fingerprint(self) -> str:
        # Paths relative to the domain folder: moving the data root keeps the fingerprint.
        h = hashlib.sha256()
        for path, label in self.samples:
            h.update(f"{path.relative_to(self.folder).as_posix()}\t{label}\n".encode())
        return h.hexdigest()[:16]


class TensorEnvironment(Environment):
    """A domain held in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``."""

    def __init__(self, name: str, images: torch.Tensor, labels):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.name = name
        self.images = images.contiguous()
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.images):
            raise ValueError("images and labels differ in length")

    def load(self, i: int) -> torch.Tensor:
        """uint8 ``[C, H, W]``."""
        return self.images[i]

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.images.numpy().tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()[:16]


@dataclass
class MultiDomainDataset:
    """Environments in DomainBed's order.

    ``key`` is the dataset's semantic identity for caches and run ids: its name plus any
    non-default construction option (never a path).
    """

    name: str
    environments: list[str]
    classes: list[str]
    envs: list[Environment]
    input_shape: tuple[int, ...]
    key: str = ""
    source: str = ""  # where the files came from (for humans; never hashed)
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.key:
            self.key = self.name

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def env_index(self, env: str | int) -> int:
        if isinstance(env, int) and not isinstance(env, bool):
            if not 0 <= env < len(self.envs):
                raise DataError(f"{self.name} has {len(self.envs)} environments; index {env} is out of range")
            return env
        if env not in self.environments:
            raise DataError(f"{self.name} has no environment {env!r}; choose one of {self.environments}")
        return self.environments.index(env)

    def __getitem__(self, env: str | int) -> Environment:
        return self.envs[self.env_index(env)]

    def __len__(self) -> int:
        return len(self.envs)

    def __iter__(self):
        return iter(self.envs)
