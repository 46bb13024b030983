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


# The tiny run most tests train: tiny_resnet on a generated PACS tree at 16 px, a few steps.
TINY_RUN = dict(dataset="PACS", backbone="tiny_resnet", k=2, resolution=16, steps=6, eval_every=3, traj_start=1,
                lr_decay_steps=(4,), batch_size=4, lr=0.05, quiet=True)
SHORT = dict(steps=4, eval_every=2, lr_decay_steps=(3,))  # the shorter schedule of the analysis tests


def tiny_config(data_root, **kw):
    """A RunConfig of :data:`TINY_RUN` on ``data_root`` with ``kw`` overriding it."""
    from linft.runs.config import RunConfig
    return RunConfig(**{**TINY_RUN, "data_root": str(data_root), **kw})
