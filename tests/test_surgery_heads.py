"""Surgery, the dropout head and BatchNorm freezing (issue: Foundation, section 3)."""
import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from linft.models.backbones import TinyResNet, build_backbone
from linft.core import DropoutHead, UnfoldedModel, block_features, freeze_batchnorm, layout_of, split_network
from linft.errors import ConfigError


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_pieces_reproduce_original_forward(block, k):
    net = TinyResNet(block=block).double().eval()
    sp = split_network(net, k, num_classes=10, keep_classifier=True)
    full = sp.full().double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    assert torch.allclose(full(x), net(x), rtol=0, atol=1e-12)


def test_efficientnet_lite0_pieces_reproduce_forward():
    net, _ = build_backbone("efficientnet_lite0")
    sp = split_network(net, 3, num_classes=1000, keep_classifier=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(sp.full().eval()(x), net.eval()(x), atol=1e-5)
    assert len(layout_of(net).blocks) == 16
    assert list(sp.tail._modules) == ["blocks_5_2", "blocks_5_3", "blocks_6_0", "conv_head", "bn2"]


def test_resnet50_layout_k3_is_layer4():
    net, spec = build_backbone("resnet50.random")
    assert spec.name == "resnet50.random"
    sp = split_network(net, 3, num_classes=7)
    assert list(sp.tail._modules) == ["layer4_0", "layer4_1", "layer4_2"]
    assert sp.head.fc.in_features == 2048 and sp.head.fc.out_features == 7
    assert list(sp.trunk._modules)[-1] == "layer3_5"


def test_split_never_mutates_and_copies():
    net = TinyResNet()
    before = copy.deepcopy(net.state_dict())
    sp = split_network(net, 2, 4, p=0.9)
    with torch.no_grad():
        for p in sp.tail.parameters():
            p.add_(1.0)
    for name, t in net.state_dict().items():
        assert torch.equal(t, before[name])
    assert net.fc.out_features == 10


def test_k_out_of_range_and_unknown_architecture():
    net = TinyResNet()  # 6 blocks
    with pytest.raises(ConfigError, match=r"k must be an integer in \[0, 6\]"):
        split_network(net, 7, 3)
    with pytest.raises(ConfigError, match="k must be"):
        split_network(net, -1, 3)
    with pytest.raises(ConfigError, match="cannot split"):
        split_network(nn.Sequential(nn.Linear(2, 2)), 1, 3)


def test_freeze_batchnorm_survives_train():
    net = freeze_batchnorm(TinyResNet())
    net.train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert net.training and net.layer1.training
    stats = [m.running_mean.clone() for m in bns]
    net(torch.randn(4, 3, 16, 16))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, bns))
    assert all(m.weight.requires_grad for m in bns)
    # a deep copy stays frozen too
    assert all(not m.training for m in copy.deepcopy(net).train().modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "x"])
def test_dropout_rate_validated(p):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        DropoutHead(4, 2, p=p)


def test_dropout_head_behaviour():
    head = DropoutHead(1000, 3, p=0.0)
    plain = nn.Linear(1000, 3)
    plain.load_state_dict(head.fc.state_dict())
    z = torch.randn(8, 1000)
    assert torch.equal(head.train()(z), plain(z))
    head9 = DropoutHead(1000, 3, p=0.9).train()
    ones = torch.ones(64, 1000)
    dropped = torch.nn.functional.dropout(ones, 0.9, True)
    kept = (dropped != 0).double().mean().item()
    assert 0.08 < kept < 0.12
    assert abs(dropped.mean().item() - 1.0) < 0.05  # inverted scaling keeps the mean
    head9.eval()
    x = torch.randn(4, 1000, 2, 2)
    assert torch.equal(head9(x), head9(x))
    assert torch.allclose(head9(x), head9.fc(x.mean((2, 3))))


def test_unfolded_model():
    net = TinyResNet(blocks=(1, 1, 1, 3)).double().eval()
    sp = split_network(net, 3, 4, p=0.0)
    h = sp.trunk.eval()(torch.randn(5, 3, 16, 16, dtype=torch.float64))
    phis = block_features(sp.tail.eval(), h)
    assert phis.shape == (5, 3, 16)
    model = UnfoldedModel([16, 16, 16], 4).double().calibrate(phis)
    rms = phis.pow(2).mean(dim=(0, 2)).sqrt()
    expected = (phis / rms.view(1, 3, 1)).sum(1)
    assert torch.allclose(model.representation(phis), expected, atol=1e-12)
    assert model(phis).shape == (5, 4)
    with pytest.raises(ConfigError, match="equal width"):
        UnfoldedModel([16, 32], 4)
    sp5 = split_network(net, 5, 4)  # layer2 (8 wide) + layer3/4 (16 wide)
    h5 = sp5.trunk.double().eval()(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(ConfigError, match="equal width"):
        block_features(sp5.tail.double().eval(), h5)


def test_core_imports_only_torch_and_stdlib():
    import sys
    allowed = {"torch", "linft"} | set(sys.stdlib_module_names) | {"__future__"}
    core = Path(__file__).resolve().parents[1] / "linft" / "core"
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
                if roots == ["linft"]:
                    assert node.module.startswith(("linft.core", "linft.errors")), (path.name, node.module)
            else:
                continue
            for r in roots:
                assert r in allowed, f"{path.name} imports {r}"


def test_dropout_mask_is_the_mask_f_dropout_draws():
    """One mask implementation: drawn from the global RNG it equals F.dropout's own, in any layout."""
    import torch.nn.functional as F
    from linft.core.heads import dropout_mask
    for fmt, shape in ((torch.contiguous_format, (4, 6)), (torch.channels_last, (2, 3, 4, 5))):
        x = torch.randn(shape).contiguous(memory_format=fmt)
        torch.manual_seed(7)
        ref = F.dropout(torch.ones_like(x), 0.7, True)
        torch.manual_seed(7)
        got = dropout_mask(x.shape, 0.7, dtype=x.dtype, device=x.device, memory_format=fmt)
        assert torch.equal(ref, got)
    g = torch.Generator().manual_seed(0)
    m = dropout_mask((20000,), 0.9, dtype=torch.float64, device="cpu", generator=g)
    assert torch.allclose(m[m > 0], torch.tensor(1 / (1 - 0.9), dtype=torch.float64)) and abs(m.mean().item() - 1.0) < 0.1
