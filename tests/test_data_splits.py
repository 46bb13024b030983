"""Splits: deterministic, disjoint, every env split, nested subsets, split before transforms."""
import numpy as np
import pytest
import torch

from linft.data.environments import MultiDomainDataset, TensorEnvironment
from linft.data.splits import make_splits
from linft.errors import ConfigError


def toy(sizes=(100, 80, 60), key="Toy"):
    envs = [TensorEnvironment(f"e{i}", torch.zeros(n, 1, 4, 4, dtype=torch.uint8), np.arange(n) % 3)
            for i, n in enumerate(sizes)]
    return MultiDomainDataset("Toy", [e.name for e in envs], ["0", "1", "2"], envs, (1, 4, 4), key=key)


def test_every_env_split_in_and_out():
    ds = toy()
    splits = make_splits(ds, ["e2"], holdout_fraction=0.2, trial_seed=0)
    assert [s.env for s in splits] == ["e0", "e1", "e2"]
    assert [s.role for s in splits] == ["train", "train", "test"]
    for s, n in zip(splits, (100, 80, 60)):
        assert len(s.out_idx) == int(n * 0.2)
        assert not set(s.in_idx) & set(s.out_idx)
        assert sorted([*s.in_idx, *s.out_idx]) == list(range(n))


def test_deterministic_and_seed_dependent():
    a = make_splits(toy(), [0], trial_seed=3)
    b = make_splits(toy(), [0], trial_seed=3)
    c = make_splits(toy(), [0], trial_seed=4)
    assert all(np.array_equal(x.out_idx, y.out_idx) for x, y in zip(a, b))
    assert not np.array_equal(a[1].out_idx, c[1].out_idx)
    # independent of which env is held out, and of the dataset's other envs
    d = make_splits(toy(), [2], trial_seed=3)
    assert np.array_equal(a[1].out_idx, d[1].out_idx)
    e = make_splits(toy(key="Other"), [0], trial_seed=3)
    assert not np.array_equal(a[1].out_idx, e[1].out_idx)


def test_subsample_nested_and_validation_fixed():
    ds = toy(sizes=(2000, 1500))
    s500 = make_splits(ds, ["e1"], n_per_domain=500, trial_seed=1)
    s1000 = make_splits(ds, ["e1"], n_per_domain=1000, trial_seed=1)
    full = make_splits(ds, ["e1"], trial_seed=1)
    assert len(s500[0].in_idx) == 500 and len(s1000[0].in_idx) == 1000
    assert set(s500[0].in_idx) <= set(s1000[0].in_idx) <= set(full[0].in_idx)
    assert np.array_equal(s500[0].out_idx, full[0].out_idx)
    assert np.array_equal(s500[1].in_idx, full[1].in_idx)  # test domains are not subsampled
    other_seed = make_splits(ds, ["e1"], n_per_domain=500, trial_seed=2)
    assert set(other_seed[0].in_idx) != set(s500[0].in_idx)


@pytest.mark.parametrize("kwargs,msg", [
    ({"test_envs": ["zz"]}, "unknown test environment"),
    ({"test_envs": [7]}, "out of range"),
    ({"test_envs": [0, 1, 2]}, "nothing is left"),
    ({"test_envs": [0], "holdout_fraction": 1.0}, "holdout_fraction"),
    ({"test_envs": [0], "n_per_domain": 10_000}, "exceeds"),
])
def test_bad_split_requests(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        make_splits(toy(), **kwargs)
