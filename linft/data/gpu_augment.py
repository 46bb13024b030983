"""DomainBed's train augmentation, batched on the device, and an infinite per-domain batch source.

:class:`DeviceAugment` maps a uint8 batch ``[B, 3, S, S]`` (from :mod:`linft.data.uint8_store`)
to a normalised float batch ``[B, 3, res, res]``, in one pass of batched tensor ops (the same code on
CPU and CUDA), doing what torchvision's
``RandomResizedCrop(res, scale=(0.7, 1)), RandomHorizontalFlip(), ColorJitter(0.3, 0.3, 0.3, 0.3),
RandomGrayscale(p=0.1), ToTensor(), Normalize(mean, std)`` does per image:

- crop: torchvision's sampling rule (area fraction U(0.7, 1), log aspect ratio U(log 3/4, log 4/3),
  integer width/height, up to 10 tries, then the central crop; offsets uniform), vectorised; the
  crop is resampled to res x res with ``F.affine_grid`` + ``F.grid_sample`` (bilinear, no
  antialias: with S = 1.14 res the per-side scale factor lies in [0.83, 1.14], where antialiasing
  changes little); the flip is the sign of the affine x-scale (no extra pass);
- colour jitter in float (torchvision's PIL path rounds to uint8 after each op): brightness
  ``x * b``, contrast ``c x + (1 - c) mean(gray(x))``, saturation ``s x + (1 - s) gray(x)``, each
  clamped to [0, 1], hue shift in HSV (torchvision's tensor ``_rgb2hsv``; the back conversion uses
  the closed form ``v - v s clamp(min(k, 4 - k), 0, 1)``, equal to its piecewise one).
  **Approximation**: torchvision applies the four ops in a random order per image; by default
  (``random_order=False``) the order is fixed (brightness, contrast, saturation, hue). Brightness
  and contrast commute up to clamping; the others do not, so the per-image distribution differs
  slightly. ``random_order=True`` reproduces the random order exactly by applying each op at each
  of the 4 positions with identity factors where the image did not pick it (4x the jitter cost,
  no host synchronisation);
- grayscale with p = 0.1 (ITU-R 601-2 luma, as torchvision), then ``(x - mean) / std``.

Randomness: all parameters of a batch are drawn from a CPU ``torch.Generator`` (a few numbers per
image) and copied to the device in one transfer, so a batch is the same on CPU and CUDA (up to
kernel rounding) and costs no device-side RNG state. :class:`DeviceBatchSource` seeds that generator
from (seed, step): step ``t`` depends only on (seed, t), so ``start`` resumes in O(1) with the same
stream (the semantics of :class:`linft.data.loaders.InfiniteBatchSampler`; the streams themselves
differ from the PIL loader's).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from linft.data.splits import derive_seed
from linft.errors import ConfigError

_GRAY = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale / PIL "L"
# columns of the per-image parameter table
_I, _J, _H, _W, _FLIP, _BRI, _CON, _SAT, _HUE, _GRAY_P = range(10)
_ORDER = slice(10, 14)
_NCOL = 14


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> (h, s, v) in [0, 1] (torchvision's ``_rgb2hsv``)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~(is_r | (maxc == g))
    h = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(h, s, v) in [0, 1] -> RGB: channel n in (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1),
    k = (n + 6 h) mod 6 (the closed form of the piecewise HSV -> RGB map)."""
    h, s, v = (t.unsqueeze(1) for t in hsv.unbind(1))
    n = torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + hue.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))


def _jitter_op(op: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    if op == 0:
        return (x * _col(f)).clamp_(0.0, 1.0)
    if op == 1:
        m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        return (x * _col(f) + (1.0 - _col(f)) * m).clamp_(0.0, 1.0)
    if op == 2:
        return (x * _col(f) + (1.0 - _col(f)) * _gray(x)).clamp_(0.0, 1.0)
    return adjust_hue(x, f)


class DeviceAugment:
    """``aug(x_uint8, params)`` -> float ``[B, 3, res, res]``; ``aug.params(S, B, generator)`` draws
    the per-image parameters ``[B, 14]`` on the CPU (see the module docstring)."""

    def __init__(self, mean, std, resolution: int, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5,
                 jitter=(0.3, 0.3, 0.3, 0.3), gray_p: float = 0.1, random_order: bool = False,
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = False):
        if int(resolution) < 8:
            raise ConfigError(f"resolution must be at least 8 pixels, got {resolution}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ConfigError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not 0 <= jitter[3] <= 0.5:
            raise ConfigError(f"hue jitter must lie in [0, 0.5], got {jitter[3]}")
        self.res, self.scale, self.ratio = int(resolution), tuple(scale), tuple(ratio)
        self.flip_p, self.jitter, self.gray_p, self.random_order = flip_p, tuple(jitter), gray_p, random_order
        self.mean, self.std = tuple(mean), tuple(std)
        self.out_dtype, self.channels_last = out_dtype, channels_last

    # -- parameters (CPU, tiny) -----------------------------------------------------------------
    def params(self, size: int, n: int, generator: torch.Generator) -> torch.Tensor:
        g, S = generator, float(size)
        u = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
        out = torch.zeros(n, _NCOL, dtype=torch.float64)
        area = S * S * (self.scale[0] + (self.scale[1] - self.scale[0]) * u(n, 10))
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        r = torch.exp(lo + (hi - lo) * u(n, 10))
        w, h = torch.round(torch.sqrt(area * r)), torch.round(torch.sqrt(area / r))
        ok = (w > 0) & (w <= S) & (h > 0) & (h <= S)
        first = torch.argmax(ok.to(torch.int8), 1, keepdim=True)  # first valid try (0 when none)
        w, h, any_ok = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(1)
        # no valid try: torchvision's fallback, the central crop with the ratio clamped (square -> whole)
        w, h = torch.where(any_ok, w, S), torch.where(any_ok, h, S)
        out[:, _I] = torch.floor(u(n) * (S - h + 1))
        out[:, _J] = torch.floor(u(n) * (S - w + 1))
        out[:, _H], out[:, _W] = h, w
        out[:, _FLIP] = (u(n) < self.flip_p).double()
        for col, a in zip((_BRI, _CON, _SAT), self.jitter[:3]):
            out[:, col] = 1.0 - a + 2 * a * u(n) if a > 0 else 1.0
        out[:, _HUE] = (2 * u(n) - 1) * self.jitter[3]
        out[:, _GRAY_P] = (u(n) < self.gray_p).double()
        out[:, _ORDER] = torch.argsort(u(n, 4), 1).double() if self.random_order else torch.arange(4.0)
        return out

    # -- the batched transform ------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ConfigError(f"expected a uint8 batch [B, 3, S, S], got {x.dtype} {tuple(x.shape)}")
        B, _, H, W = x.shape
        p = params.to(x.device, torch.float32, non_blocking=True)
        sx = torch.where(p[:, _FLIP] > 0, -1.0, 1.0) * p[:, _W] / W
        sy = p[:, _H] / H
        tx = (2 * p[:, _J] + p[:, _W]) / W - 1
        ty = (2 * p[:, _I] + p[:, _H]) / H - 1
        zero = torch.zeros_like(sx)
        theta = torch.stack((torch.stack((sx, zero, tx), 1), torch.stack((zero, sy, ty), 1)), 1)
        grid = F.affine_grid(theta, [B, 3, self.res, self.res], align_corners=False)
        y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        y = y.mul_(1.0 / 255).clamp_(0.0, 1.0)
        y = self._jitter(y, p)
        gray = _col(p[:, _GRAY_P] > 0)
        y = torch.where(gray, _gray(y).expand_as(y), y)
        return self._normalize(y)

    def _jitter(self, y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        cols, ident = (_BRI, _CON, _SAT, _HUE), (1.0, 1.0, 1.0, 0.0)
        active = [op for op in range(4) if self.jitter[op] > 0]
        if not self.random_order:
            for op in active:
                y = _jitter_op(op, y, p[:, cols[op]])
            return y
        order = p[:, _ORDER]
        for pos in range(4):
            for op in active:
                f = torch.where(order[:, pos] == op, p[:, cols[op]], torch.full_like(p[:, 0], ident[op]))
                y = _jitter_op(op, y, f)
        return y

    def _normalize(self, y: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
        inv = 1.0 / torch.tensor(self.std, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
        y = (y - mean).mul_(inv).to(self.out_dtype)
        return y.contiguous(memory_format=torch.channels_last) if self.channels_last else y


class DeviceEval(DeviceAugment):
    """The eval transform on stored uint8 images: resize S -> res (bilinear, antialiased; identity
    when S == res), then normalise. No random parameters."""

    def params(self, size: int, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.zeros(n, 0)

    def __call__(self, x: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        y = x.float().mul_(1.0 / 255)
        if y.shape[-1] != self.res or y.shape[-2] != self.res:
            y = F.interpolate(y, size=(self.res, self.res), mode="bilinear", antialias=True,
                              align_corners=False).clamp_(0.0, 1.0)
        return self._normalize(y)


class DeviceBatchSource:
    """Endless ``(x, y)`` batches of one domain from uint8 ``images`` ``[N, 3, S, S]`` (on the device,
    or on the host: then each batch is gathered there and copied), transformed on ``device``.

    Step ``t`` (counted from 0; ``start`` skips to it in O(1)) uses a CPU generator seeded by
    (seed, t) for its indices (``replacement=True``: uniform with replacement, as DomainBed;
    ``False``: successive seeded permutations, each example once per epoch) and augmentation.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices, batch_size: int, seed: int,
                 transform: DeviceAugment, replacement: bool = True, start: int = 0,
                 device: str | torch.device | None = None):
        self.indices = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        if len(self.indices) == 0:
            raise ConfigError("cannot build a batch source over an empty split")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.images, self.transform = images, transform
        self.device = torch.device(device) if device is not None else images.device
        self.labels = torch.as_tensor(labels).to(self.device)
        self.batch_size, self.seed, self.replacement, self.start = batch_size, seed, replacement, start
        self._perm: tuple[int, torch.Tensor] | None = None

    def _epoch_perm(self, e: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != e:
            g = torch.Generator().manual_seed(derive_seed("perm", self.seed, e))
            self._perm = (e, torch.randperm(len(self.indices), generator=g))
        return self._perm[1]

    def positions(self, step: int, g: torch.Generator) -> torch.Tensor:
        n, B = len(self.indices), self.batch_size
        if self.replacement:
            return torch.randint(0, n, (B,), generator=g)
        return self._slice(step * B, B)

    def _slice(self, first: int, B: int) -> torch.Tensor:
        n, parts, k = len(self.indices), [], first
        while k < first + B:
            e, off = divmod(k, n)
            take = min(n - off, first + B - k)
            parts.append(self._epoch_perm(e)[off:off + take])
            k += take
        return torch.cat(parts)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(derive_seed("batch", self.seed, step))
        idx = self.indices[self.positions(step, g)]
        params = self.transform.params(self.images.shape[-1], len(idx), g)
        if self.images.device == self.device:
            x = self.images.index_select(0, idx.to(self.device, non_blocking=True))
        else:  # host store, device compute: gather on the host, one copy
            x = self.images.index_select(0, idx)
            if self.device.type == "cuda":
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True)
        return self.transform(x, params), self.labels.index_select(0, idx.to(self.device, non_blocking=True))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = self.start
        while True:
            yield self.batch(step)
            step += 1


class DeviceSplit:
    """Ordered eval batches ``(x, y)`` of one split from a uint8 store, transformed on ``device``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices, batch_size: int, transform, device):
        self.images, self.labels, self.transform, self.device = images, labels, transform, device
        self.indices, self.batch_size = torch.as_tensor(indices, dtype=torch.int64), batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            idx = self.indices[start:start + self.batch_size]
            x = self.images.index_select(0, idx.to(self.images.device)).to(self.device, non_blocking=True)
            yield self.transform(x), self.labels.index_select(0, idx.to(self.labels.device))


def device_train_sources(stores: dict, splits, transform: DeviceAugment, *, batch_size: int = 32, seed: int = 0,
                         replacement: bool = True, start_step: int = 0, device="cpu",
                         max_fraction: float = 0.5) -> list[DeviceBatchSource]:
    """One :class:`DeviceBatchSource` per training split (environment order), seeded by
    (seed, env name) like :func:`linft.data.loaders.train_loaders`; a drop-in for it (each
    ``iter`` yields ``(x, y)`` already on ``device``, transformed). ``stores``: env name ->
    :class:`~linft.data.uint8_store.Uint8Store`."""
    out = []
    for s in splits:
        if s.role != "train":
            continue
        if s.env not in stores:
            raise ConfigError(f"no uint8 store for environment {s.env!r} among {sorted(stores)}")
        images, labels = stores[s.env].tensors(device, max_fraction)
        out.append(DeviceBatchSource(images, labels, s.in_idx, batch_size, derive_seed("loader", seed, s.env),
                                     transform, replacement, start_step, device))
    return out
