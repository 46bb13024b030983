"""Feature cache: keyed by semantics not paths, reused, rebuilt, float16 bound, two processes,
and training a tail on cached features equals running the frozen trunk on the fly."""
import copy
import multiprocessing as mp
import shutil
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from linft.data.datasets import get_dataset
from linft.data.errors import CorruptImageError
from linft.data.feature_cache import FeatureCache, cache_environments, module_hash
from linft.data.loaders import EnvDataset, train_loaders, zip_minibatches
from linft.data.splits import make_splits
from linft.data.synthetic import make_image_tree
from linft.data.transforms import eval_transform, train_transform
from linft.errors import ConfigError

MEAN, STD, RES = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 16


def make_trunk(sleep: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, stride=2, padding=1))
    trunk[1].running_mean.uniform_(-0.2, 0.2)
    trunk[1].running_var.uniform_(0.5, 2.0)
    if sleep:
        trunk.register_forward_hook(lambda *a: time.sleep(sleep))
    return trunk.eval()


def key_for(env, **over):
    key = {"backbone": "toy", "weights": module_hash(make_trunk()), "split": "k=1", "dataset": "PACS",
           "domain": env.name, "resolution": RES}
    return {**key, **over}


@pytest.fixture
def pacs(tmp_path):
    make_image_tree(tmp_path / "data", "PACS", n_per_class=3, size=20)
    return get_dataset("PACS", tmp_path / "data")


def test_features_match_trunk_and_are_reused(pacs, tmp_path):
    cache, trunk, env = FeatureCache(tmp_path / "cache"), make_trunk(), pacs["A"]
    feats = cache.get(trunk, key_for(env), env, MEAN, STD)
    assert feats.built and feats.features.shape == (9, 6, 8, 8) and isinstance(feats.features, np.memmap)
    x = torch.stack([eval_transform(MEAN, STD, RES)(env.load(i)) for i in range(len(env))])
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(np.array(feats.features)), trunk(x), atol=1e-5)
    assert np.array_equal(feats.labels, env.labels)
    trunk.train()
    again = cache.get(trunk, key_for(env), env, MEAN, STD)
    assert not again.built and again.path == feats.path and trunk.training  # mode restored


def test_key_changes_rebuild_and_root_does_not(pacs, tmp_path):
    cache, trunk, env = FeatureCache(tmp_path / "cache"), make_trunk(), pacs["C"]
    first = cache.get(trunk, key_for(env), env, MEAN, STD)
    for change in ({"split": "k=2"}, {"weights": "other"}, {"resolution": 24}, {"backbone": "b"}, {"dataset": "X"}):
        assert cache.get(trunk, key_for(env, **change), env, MEAN, STD).built
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "data", moved)
    env2 = get_dataset("PACS", moved)["C"]
    assert cache.get(trunk, key_for(env2), env2, MEAN, STD).path == first.path
    next((moved / "PACS" / "cartoon" / "dog").iterdir()).unlink()  # content changed: rebuild
    env3 = get_dataset("PACS", moved)["C"]
    assert cache.get(trunk, key_for(env3), env3, MEAN, STD).built
    with pytest.raises(ConfigError, match="lacks"):
        cache.get(trunk, {"backbone": "toy"}, env, MEAN, STD)
    with pytest.raises(ConfigError, match="dtype"):
        FeatureCache(tmp_path, dtype="int8")


def test_float16_error_is_bounded(pacs, tmp_path):
    trunk, env = make_trunk(), pacs["P"]
    f32 = np.asarray(FeatureCache(tmp_path / "a").get(trunk, key_for(env), env, MEAN, STD).features)
    f16 = FeatureCache(tmp_path / "b", dtype="float16").get(trunk, key_for(env), env, MEAN, STD)
    assert f16.features.dtype == np.float16
    err = np.abs(f16.features.astype(np.float32) - f32)
    assert (err <= 2.0 ** -11 * np.abs(f32) + 1e-7).all()
    assert f16.load(0).dtype == torch.float32


def test_corrupt_image_fails_cache_build_cleanly(pacs, tmp_path):
    env = pacs["S"]
    bad = env.samples[4][0]
    bad.write_bytes(bad.read_bytes()[:50])
    cache_dir = tmp_path / "cache"
    with pytest.raises(CorruptImageError, match=bad.name):
        FeatureCache(cache_dir).get(make_trunk(), key_for(env), env, MEAN, STD)
    assert [p.name for p in cache_dir.iterdir() if p.is_dir()] == []  # no half-built cache


def _build_in_process(root, cache_dir, barrier, out):
    env = get_dataset("PACS", root)["A"]
    barrier.wait()
    feats = FeatureCache(cache_dir, batch_size=3).get(make_trunk(sleep=0.05), key_for(env), env, MEAN, STD)
    out.put((feats.built, str(feats.path), float(np.asarray(feats.features, np.float64).sum())))


def test_two_processes_build_once(pacs, tmp_path):
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(tmp_path / "data", tmp_path / "cache", barrier, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(r[0] for r in results) == [False, True]  # one built, the other waited and reused
    assert results[0][1:] == results[1][1:]
    dirs = [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(dirs) == 1 and not dirs[0].startswith(".tmp")


def test_tail_on_cache_equals_trunk_on_the_fly(pacs, tmp_path):
    trunk = make_trunk()
    splits = make_splits(pacs, ["S"], trial_seed=0)
    cached = cache_environments(FeatureCache(tmp_path / "cache"), trunk, pacs, backbone="toy", weights="w",
                                split="k=1", resolution=RES, mean=MEAN, std=STD)
    torch.manual_seed(1)
    tail_a = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(8, 3))
    tail_b = copy.deepcopy(tail_a)

    def train(tail, loaders, through_trunk):
        opt = torch.optim.SGD(tail.parameters(), lr=0.1, momentum=0.9)
        it = zip_minibatches(loaders)
        for _ in range(6):
            batch = next(it)
            x = torch.cat([x for x, _ in batch])
            y = torch.cat([y for _, y in batch])
            if through_trunk:
                with torch.no_grad():
                    x = trunk(x)
            loss = nn.functional.cross_entropy(tail(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    la = train(tail_a, train_loaders(cached, splits, None, batch_size=4, seed=7), False)
    lb = train(tail_b, train_loaders(pacs, splits, eval_transform(MEAN, STD, RES), batch_size=4, seed=7), True)
    assert abs(la - lb) < 1e-5
    for pa, pb in zip(tail_a.parameters(), tail_b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)
    with pytest.raises(ConfigError, match="exclude each other"):
        EnvDataset(cached["A"], train_transform(MEAN, STD, RES))
