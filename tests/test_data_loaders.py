"""Transforms and loaders: DomainBed's pipelines, 3 channels, seeded infinite loaders, zipped steps."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from linft.data.datasets import get_dataset
from linft.data.environments import MultiDomainDataset, TensorEnvironment
from linft.data.loaders import eval_loaders, require_compatible, train_loaders, zip_minibatches
from linft.data.splits import make_splits
from linft.data.synthetic import make_image_tree
from linft.data.transforms import ToRGB, eval_transform, is_random, train_transform, transforms_for
from linft.errors import ConfigError


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_image_tree(root, "PACS", n_per_class=4, size=24, fmt="jpg")
    return get_dataset("PACS", root)


def test_train_transform_is_domainbed():
    t = train_transform((0.5,) * 3, (0.5,) * 3, 40)
    kinds = [type(s) for s in t.transforms]
    assert kinds == [ToRGB, T.RandomResizedCrop, T.RandomHorizontalFlip, T.ColorJitter, T.RandomGrayscale,
                     T.ToTensor, T.Normalize]
    assert t.transforms[1].scale == (0.7, 1.0) and t.transforms[1].size == (40, 40)
    cj = t.transforms[3]
    assert cj.brightness == (0.7, 1.3) and cj.hue == (-0.3, 0.3)
    assert is_random(t) and not is_random(eval_transform((0.5,) * 3, (0.5,) * 3, 40))


def test_backbone_normalisation_and_resolution():
    t = transforms_for("efficientnet_lite0", resolution=48)
    x = t(Image.new("RGB", (30, 20), (255, 0, 128)))
    assert x.shape == (3, 48, 48)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-6)
    assert transforms_for("resnet50").transforms[1].size == (224, 224)


def test_grey_and_two_channel_tensors_become_rgb():
    grey = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    x = eval_transform((0.0,) * 3, (1.0,) * 3, 28)(grey)
    assert x.shape == (3, 28, 28) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert torch.allclose(x[0], grey[0].float() / 255)
    two = torch.randint(0, 256, (2, 14, 14), dtype=torch.uint8)
    rgb = np.asarray(ToRGB()(two))
    assert np.array_equal(rgb[..., 0], two[0].numpy()) and rgb[..., 2].max() == 0


def test_infinite_loaders_deterministic_and_zipped(pacs):
    splits = make_splits(pacs, ["S"])
    t = transforms_for("resnet18", 24, augment=True)

    def steps(seed, workers=0, n=3):
        it = zip_minibatches(train_loaders(pacs, splits, t, batch_size=5, seed=seed, num_workers=workers))
        return [next(it) for _ in range(n)]

    a, b, c = steps(0), steps(0), steps(1)
    assert len(a[0]) == 3  # one minibatch per training domain
    for x, y in a[0]:
        assert x.shape == (5, 3, 24, 24) and y.dtype == torch.int64
    flat = lambda s: torch.cat([x.flatten() for step in s for x, _ in step])  # noqa: E731
    assert torch.equal(flat(a), flat(b)) and not torch.equal(flat(a), flat(c))
    torch.manual_seed(123)  # the global generator does not leak into the stream
    assert torch.equal(flat(steps(0)), flat(a))
    # indices come from the in split only
    allowed = set(splits[0].in_idx)
    it = iter(train_loaders(pacs, splits, t, batch_size=64, seed=0)[0].sampler)
    assert {i for i, _ in next(it)} <= allowed


def test_workers_give_the_same_stream(pacs):
    splits = make_splits(pacs, ["S"])
    t = transforms_for("resnet18", 24, augment=True)
    l0 = train_loaders(pacs, splits[:1], t, batch_size=4, seed=5, num_workers=0)[0]
    l2 = train_loaders(pacs, splits[:1], t, batch_size=4, seed=5, num_workers=2)[0]
    i0, i2 = iter(l0), iter(l2)
    for _ in range(2):
        (x0, y0), (x2, y2) = next(i0), next(i2)
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_validation_is_never_augmented(pacs):
    splits = make_splits(pacs, ["S"])
    t = transforms_for("resnet18", 24, augment=False)
    loaders = eval_loaders(pacs, splits, t, batch_size=100)
    assert set(loaders) == {(e, s) for e in pacs.environments for s in ("in", "out")}
    x1, _ = next(iter(loaders[("A", "out")]))
    x2, _ = next(iter(loaders[("A", "out")]))
    assert torch.equal(x1, x2) and len(x1) == len(splits[0].out_idx)


def test_mnist_env_loader_three_channels():
    env = TensorEnvironment("e", torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8), np.arange(10) % 2)
    ds = MultiDomainDataset("T", ["e", "f"], ["0", "1"], [env, env], (1, 28, 28))
    ds.envs[1] = TensorEnvironment("f", env.images, env.labels)
    x, y = next(iter(train_loaders(ds, make_splits(ds, ["f"]), transforms_for("resnet18", 32, augment=True),
                                   batch_size=4)[0]))
    assert x.shape == (4, 3, 32, 32)


def test_augment_and_cache_exclude_each_other():
    with pytest.raises(ConfigError, match="exclude each other"):
        require_compatible(augment=True, feature_cache=True)
    require_compatible(augment=True, feature_cache=False)


def test_start_step_continues_the_same_stream():
    from linft.data.loaders import InfiniteBatchSampler
    for replacement in (True, False):
        full = iter(InfiniteBatchSampler(range(10), 4, seed=3, replacement=replacement))
        batches = [next(full) for _ in range(7)]
        resumed = iter(InfiniteBatchSampler(range(10), 4, seed=3, replacement=replacement, start=5))
        assert [next(resumed), next(resumed)] == batches[5:7]


def test_loaders_leave_the_global_rng_alone():
    """Creating or draining a loader iterator must not move torch's global RNG (dropout masks):
    otherwise a resumed run draws other masks than an uninterrupted one."""
    import torch
    from linft.data.environments import TensorEnvironment
    from linft.data.loaders import InfiniteLoader
    env = TensorEnvironment("e", torch.zeros(6, 1, 2, 2, dtype=torch.uint8), [0, 1, 0, 1, 0, 1])
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    it = iter(InfiniteLoader(env, range(6), batch_size=2, seed=1))
    next(it)
    assert torch.equal(torch.rand(3), expected)


def test_cached_feature_batches_equal_the_dataloader_path(tmp_path):
    """The gather fast path for cached features yields exactly the DataLoader's batches."""
    import numpy as np
    import torch
    from linft.data.feature_cache import CachedFeatures
    from linft.data.loaders import InfiniteLoader
    feats = np.random.default_rng(0).normal(size=(10, 3, 2, 2)).astype(np.float16)
    env = CachedFeatures("e", feats, np.arange(10) % 3, tmp_path, built=True)
    fast = InfiniteLoader(env, range(10), batch_size=4, seed=2)
    assert fast.arrays is not None
    slow = InfiniteLoader(env, range(10), batch_size=4, seed=2)
    slow.arrays = None
    for (a, ya), (b, yb), _ in zip(fast, slow, range(5)):
        assert torch.equal(a, b) and torch.equal(ya, yb) and a.dtype == torch.float32
