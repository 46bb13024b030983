import pytest
import torch

# One thread: tiny models gain nothing from two, and two OpenMP threads on a busy 2-core machine
# spin against each other (a 3x3 conv went from 0.15 ms to 24 ms under load).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_split(block="basic", k=2, p=0.0, num_classes=5, dtype=torch.float64):
    """A TinyResNet split into trunk | tail (last k blocks) | head, in float64."""
    from linft.models.backbones import TinyResNet
    from linft.core import split_network
    net = TinyResNet(block=block).to(dtype)
    sp = split_network(net, k, num_classes, p=p)
    for part in (sp.trunk, sp.tail, sp.head):
        part.to(dtype)
    return net, sp


def trunk_features(sp, n=4, res=16, dtype=torch.float64):
    x = torch.randn(n, 3, res, res, dtype=dtype)
    sp.trunk.eval()
    with torch.no_grad():
        return sp.trunk(x)
