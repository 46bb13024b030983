"""uint8 store + batched device augmentation + device batch source (issue #7, part 1)."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from linft.data.datasets import get_dataset
from linft.data.environments import TensorEnvironment
from linft.data.gpu_augment import DeviceAugment, DeviceBatchSource, DeviceEval, adjust_hue, device_train_sources
from linft.data.splits import make_splits
from linft.data.synthetic import make_image_tree
from linft.data.transforms import eval_transform, train_transform
from linft.data.uint8_store import Uint8StoreCache, decode_resized, store_environments, store_size

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_store_size_is_domainbed_ratio():
    assert store_size(224) == 256
    assert store_size(64) == 74


def test_crop_params_match_torchvision_distribution():
    S, n = 74, 3000
    aug = DeviceAugment(MEAN, STD, 64)
    p = aug.params(S, n, _gen()).numpy()
    i, j, h, w = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    assert (i >= 0).all() and (j >= 0).all() and (i + h <= S).all() and (j + w <= S).all()
    area = h * w / S**2
    torch.manual_seed(0)
    ref = np.array([T.RandomResizedCrop.get_params(torch.zeros(3, S, S), (0.7, 1.0), (3 / 4, 4 / 3))
                    for _ in range(n)], dtype=float)
    ref_area = ref[:, 2] * ref[:, 3] / S**2
    assert area.min() >= 0.68 and area.max() <= 1.0 and ref_area.min() >= 0.68
    assert abs(area.mean() - ref_area.mean()) < 0.01
    assert abs(np.log(w / h).mean() - np.log(ref[:, 3] / ref[:, 2]).mean()) < 0.02
    assert abs(np.mean(w == S) - np.mean(ref[:, 3] == S)) < 0.04  # the fallback/full-width rate
    assert abs(p[:, 4].mean() - 0.5) < 0.04  # flip
    assert abs(p[:, 9].mean() - 0.1) < 0.02  # grayscale
    for col in (5, 6, 7):
        assert 0.7 <= p[:, col].min() and p[:, col].max() <= 1.3
    assert -0.3 <= p[:, 8].min() and p[:, 8].max() <= 0.3


def test_hue_matches_torchvision_tensor_hue():
    x = torch.rand(4, 3, 9, 9)
    for h in (0.27, -0.13):
        ref = torch.stack([T.functional.adjust_hue(xi, h) for xi in x])
        assert torch.allclose(adjust_hue(x, torch.full((4,), h)), ref, atol=1e-5)


def test_crop_flip_grayscale_on_pixels():
    S = 16
    ramp = torch.arange(S, dtype=torch.float32).mul(255 / (S - 1)).round().to(torch.uint8)
    x = torch.stack([ramp.view(1, 1, S).expand(3, S, S)] * 400).contiguous()
    x[:, 0] = 255 - x[:, 0]  # colour, so grayscale is visible
    aug = DeviceAugment((0.5,) * 3, (0.5,) * 3, S, scale=(1, 1), ratio=(1, 1), jitter=(0, 0, 0, 0))
    p = aug.params(S, len(x), _gen(1))
    y = aug(x, p) * 0.5 + 0.5
    flipped = y[:, 1, :, 0] > y[:, 1, :, -1]  # green channel rises left to right unless flipped
    assert torch.equal(flipped.all(1), p[:, 4] > 0)
    gray = (y[:, 0] - y[:, 1]).abs().amax((1, 2)) < 1e-5
    assert torch.equal(gray, p[:, 9] > 0)
    # a full crop without flip/jitter reproduces the image exactly
    keep = (p[:, 4] == 0) & (p[:, 9] == 0)
    assert torch.allclose(y[keep], x[keep].float() / 255, atol=1e-5)


def test_output_statistics_close_to_torchvision_pipeline():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96] / 96
    img = np.stack([xx, yy, 0.5 + 0.4 * np.sin(6 * xx)], -1) * 0.8 + 0.1 * rng.random((96, 96, 3))
    pil = Image.fromarray((img * 255).astype(np.uint8))
    res, n = 32, 300
    tv = train_transform(MEAN, STD, res)
    torch.manual_seed(0)
    ref = torch.stack([tv(pil) for _ in range(n)])
    stored = torch.from_numpy(decode_resized(pil, store_size(res)))[None].expand(n, -1, -1, -1).contiguous()
    for order in (False, True):
        aug = DeviceAugment(MEAN, STD, res, random_order=order)
        out = aug(stored, aug.params(stored.shape[-1], n, _gen(2)))
        assert out.shape == (n, 3, res, res) and out.dtype == torch.float32
        # per-channel mean, spread of per-image means (jitter), mean per-image contrast
        assert torch.allclose(out.mean((0, 2, 3)), ref.mean((0, 2, 3)), atol=0.08)
        assert torch.allclose(out.mean((2, 3)).std(0), ref.mean((2, 3)).std(0), rtol=0.25)
        assert torch.allclose(out.std((2, 3)).mean(0), ref.std((2, 3)).mean(0), rtol=0.15)


def test_store_roundtrip_equals_eval_transform(tmp_path):
    make_image_tree(tmp_path / "data", "PACS", n_per_class=2, size=40)
    ds = get_dataset("PACS", tmp_path / "data")
    res = 24
    ev = eval_transform(MEAN, STD, res)
    cache = Uint8StoreCache(tmp_path / "store")
    env = ds.envs[0]
    # S == res: the store is exactly the eval transform's resized image
    st = cache.get({"dataset": ds.key, "domain": env.name, "size": res}, env)
    assert st.built and st.images.shape == (len(env), 3, res, res) and st.images.dtype == np.uint8
    assert np.array_equal(st.labels, env.labels)
    ref = torch.stack([ev(env.load(i)) for i in range(len(env))])
    got = DeviceEval(MEAN, STD, res)(torch.from_numpy(np.asarray(st.images)))
    assert torch.allclose(got, ref, atol=1e-5)
    # S = 1.14 res, resized on the fly: bilinear-antialias of a resize, close to the direct resize
    stores = store_environments(cache, ds, res)
    big = torch.from_numpy(np.asarray(stores[env.name].images))
    assert big.shape[-1] == store_size(res)
    got = DeviceEval(MEAN, STD, res)(big)
    # noisy synthetic images: mean |diff| ~0.033 normalised = ~2/255 of the 0-1 range
    assert (got - ref).abs().mean() < 0.05


def test_store_reuse_key_and_atomicity(tmp_path):
    make_image_tree(tmp_path / "a", "PACS", n_per_class=1, size=20)
    ds = get_dataset("PACS", tmp_path / "a")
    cache = Uint8StoreCache(tmp_path / "store")
    first = store_environments(cache, ds, 16)
    assert all(s.built for s in first.values())
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "store").iterdir())
    again = store_environments(cache, ds, 16)
    assert not any(s.built for s in again.values())
    shutil.move(tmp_path / "a", tmp_path / "b")  # moving the data root keeps the store
    moved = store_environments(cache, get_dataset("PACS", tmp_path / "b"), 16)
    assert not any(s.built for s in moved.values())
    assert {s.path for s in moved.values()} == {s.path for s in first.values()}
    other = store_environments(cache, get_dataset("PACS", tmp_path / "b"), 20)
    assert all(s.built for s in other.values())  # another size, another store


def _tensor_env(n=20, S=12, name="E"):
    g = torch.Generator().manual_seed(3)
    return TensorEnvironment(name, torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=g),
                             np.arange(n) % 3)


def test_batch_source_determinism_and_start():
    env = _tensor_env()
    aug = DeviceAugment(MEAN, STD, 10)
    mk = lambda start=0, seed=5, repl=True: DeviceBatchSource(env.images, env.labels, np.arange(20), 4, seed, aug,  # noqa: E731
                                                              repl, start)
    it0, it1 = iter(mk()), iter(mk())
    a = [next(it0) for _ in range(6)]
    b = [next(it1) for _ in range(6)]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xs, ys = next(iter(mk(start=4)))
    assert torch.equal(xs, a[4][0]) and torch.equal(ys, a[4][1])
    xo, _ = next(iter(mk(seed=6)))
    assert not torch.equal(xo, a[0][0])
    # without replacement: each example once per epoch, across batch boundaries
    src = mk(repl=False)
    g = torch.Generator()
    seen = torch.cat([src.positions(t, g) for t in range(10)])  # 40 = 2 epochs
    assert sorted(seen[:20].tolist()) == list(range(20)) and sorted(seen[20:].tolist()) == list(range(20))
    assert torch.equal(mk(repl=False, start=7).batch(7)[0], src.batch(7)[0])


def test_device_train_sources_drop_in(tmp_path):
    make_image_tree(tmp_path / "data", "PACS", n_per_class=3, size=24)
    ds = get_dataset("PACS", tmp_path / "data")
    splits = make_splits(ds, ["S"])
    stores = store_environments(Uint8StoreCache(tmp_path / "st"), ds, 16)
    srcs = device_train_sources(stores, splits, DeviceAugment(MEAN, STD, 16, channels_last=True), batch_size=5,
                                seed=1)
    assert len(srcs) == 3
    from linft.data.loaders import zip_minibatches
    step = next(zip_minibatches(srcs))
    assert [tuple(x.shape) for x, _ in step] == [(5, 3, 16, 16)] * 3
    for (x, y), s in zip(step, [s for s in splits if s.role == "train"]):
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert set(y.tolist()) <= set(ds[s.env].labels.tolist())
    with pytest.raises(Exception):
        device_train_sources({}, splits, DeviceAugment(MEAN, STD, 16))
