"""Edge cases of linft.core found by a float64 audit: the one-pass engine against the jvp reference
on bias-only layers, shared modules and random small graphs; the distance between near-equal deltas."""
import math
import random

import pytest
import torch
import torch.nn as nn

from linft.core import linearize
from linft.core.params import delta_comparison
from linft.core.tangent import build_primal_cache

TOL = 1e-10


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _perturb(lins, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ps in zip(*(list(m.parameters()) for m in lins)):
            d = scale * torch.randn(ps[0].shape, generator=g, dtype=ps[0].dtype)
            for p in ps:
                p.add_(d)


def agree(module, x, seed=0, tol=TOL, cache=True):
    """onepass vs jvp: f0, the tangent (same shape), f0 + df, and the gradients w.r.t. theta agree."""
    lj, lo = linearize(module), linearize(module, engine="onepass")
    _perturb([lj, lo], seed)
    lj.eval(), lo.eval()
    f0j, dfj = lj.taylor_terms(x)
    f0o, dfo = lo.taylor_terms(x)
    assert dfo.shape == dfj.shape == f0j.shape, (dfo.shape, dfj.shape)
    assert rel(f0o, f0j) < tol, rel(f0o, f0j)
    assert rel(dfo, dfj) < tol, rel(dfo, dfj)
    w = torch.randn(f0j.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=f0j.dtype)
    gj = torch.autograd.grad(((f0j + dfj) * w).sum(), list(lj.theta().values()))
    go = torch.autograd.grad(((f0o + dfo) * w).sum(), list(lo.theta().values()))
    for n, a, b in zip(lj.theta(), go, gj):
        assert rel(a, b) < tol, (n, rel(a, b))
    if cache:  # the primal cache replays the same tangent (shapes included)
        pc = build_primal_cache(lo, x, batch_size=max(1, x.shape[0] // 2 + 1))
        idx = torch.arange(x.shape[0] - 1, -1, -1)
        f0c, dfc = pc.taylor_terms(idx)
        assert dfc.shape == dfj[idx].shape
        assert rel(f0c, f0j[idx]) < tol and rel(dfc, dfj[idx]) < tol, (rel(f0c, f0j[idx]), rel(dfc, dfj[idx]))
        f0s, dfs = pc.taylor_terms(slice(1, None))
        assert rel(dfs, dfj[1:]) < tol
    return lj, lo


def bias_only(*mods):
    for m in mods:
        for n, p in m.named_parameters():
            p.requires_grad_(n.endswith("bias"))


def eval_bn(bn, g):
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g, dtype=bn.running_mean.dtype))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g, dtype=bn.running_var.dtype) + 0.5)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.weight.shape, generator=g, dtype=bn.weight.dtype))
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g, dtype=bn.bias.dtype))
    return bn.eval()


# ---- 1. bias-only layers: full-shape tangents ---------------------------------------------------

def test_bias_only_conv_then_padded_conv_is_exact():
    """Old engine: the bias-only conv's tangent was [1, C, 1, 1]; the padded conv after it then
    treated the borders wrongly (5e-2 relative error)."""
    torch.manual_seed(0)
    c1, c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
    bias_only(c1)
    agree(nn.Sequential(c1, c2).double(), torch.randn(3, 3, 6, 6, dtype=torch.float64))


def test_bias_only_conv_then_trainable_batchnorm_does_not_crash():
    """Old engine: the BatchNorm's in-place ``dy.addcmul_(xhat, dgamma)`` on a [1, C, 1, 1] tangent raised."""
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    c1, bn = nn.Conv2d(3, 4, 3, padding=1), eval_bn(nn.BatchNorm2d(4), g)
    bias_only(c1)
    agree(nn.Sequential(c1, bn, nn.ReLU()).double(), torch.randn(3, 3, 5, 5, dtype=torch.float64))


def test_bias_only_linear_then_batchnorm1d_and_output_shape():
    """Old engine: a trailing bias-only Linear gave a tangent of shape [C], not [B, C]."""
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    l1, bn, l2 = nn.Linear(5, 4), eval_bn(nn.BatchNorm1d(4), g), nn.Linear(4, 3)
    bias_only(l1, l2)
    agree(nn.Sequential(l1, bn, nn.ReLU(), l2).double(), torch.randn(6, 5, dtype=torch.float64))
    agree(nn.Sequential(nn.Linear(5, 3)).double().requires_grad_(False).apply(
        lambda m: m.bias.requires_grad_(True) if isinstance(m, nn.Linear) else None),
        torch.randn(4, 5, dtype=torch.float64))


# ---- 2. shared modules and tied weights --------------------------------------------------------

def test_module_used_twice_is_exact():
    """Old engine: the second use of a conv was read by its second path (absent from theta0), i.e.
    as a constant at theta: f0 and the tangent wrong (2.65 relative)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    agree(nn.Sequential(conv, nn.ReLU(), conv, nn.GELU()).double(), torch.randn(2, 4, 5, 5, dtype=torch.float64))
    lin = nn.Linear(4, 4)
    agree(nn.Sequential(lin, nn.ReLU(), lin).double(), torch.randn(3, 4, dtype=torch.float64))


def test_tied_weights_between_two_modules_are_exact():
    torch.manual_seed(4)
    a, b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
    b.weight = a.weight  # tied weight, separate biases
    agree(nn.Sequential(a, nn.ReLU(), b).double(), torch.randn(2, 3, 5, 5, dtype=torch.float64))


# ---- property test: random small graphs --------------------------------------------------------

class BasicBlock(nn.Module):
    """torchvision's BasicBlock (same attributes and forward), recognised by the one-pass engine."""

    def __init__(self, cin, cout, stride, rng):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=rng.random() < 0.5)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=rng.random() < 0.5),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


class Residual(nn.Module):
    """An unknown block (the one-pass engine runs it through its jvp fallback)."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


ACTS = [nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Identity]


def random_graph(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c = c0 = rng.choice([2, 4])
    layers, shared = [], None
    for _ in range(rng.randint(2, 5)):
        kind = rng.choice(["conv", "conv", "bn", "act", "block", "res", "shared"])
        if kind == "conv":
            groups = rng.choice([g_ for g_ in (1, 2, c) if c % g_ == 0])
            cout = c * rng.choice([1, 2]) if groups == 1 else c
            k = rng.choice([1, 3])
            layers.append(nn.Conv2d(c, cout, k, stride=2 if rng.random() < 0.3 else 1, padding=rng.choice([0, k // 2]),
                                    groups=groups, bias=rng.random() < 0.6))
            c = cout
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(c, affine=rng.random() < 0.8))
        elif kind == "act":
            layers.append(rng.choice(ACTS)())
        elif kind == "block":
            cout = rng.choice([c, 2 * c])
            layers.append(BasicBlock(c, cout, rng.choice([1, 2]) if cout != c else 1, rng))
            c = cout
        elif kind == "res":
            layers.append(Residual(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), rng.choice(ACTS)())))
        else:  # the same conv used twice (around an activation)
            shared = shared if shared is not None and shared.in_channels == c else nn.Conv2d(c, c, 3, padding=1)
            layers += [shared, rng.choice(ACTS)(), shared]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3, bias=rng.random() < 0.8)]
    net = nn.Sequential(*layers).double()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            eval_bn(m, g)
    params = list(net.named_parameters())
    subset = rng.choice(["all", "random", "bias", "biasfirst"])
    for i, (n, p) in enumerate(params):
        if subset == "random":
            p.requires_grad_(rng.random() < 0.5)
        elif subset == "bias":
            p.requires_grad_(n.endswith("bias"))
        elif subset == "biasfirst":  # bias-only trainable in front, everything after trainable
            p.requires_grad_(n.endswith("bias") or i >= len(params) // 2)
    if not any(p.requires_grad for p in net.parameters()):
        params[-1][1].requires_grad_(True)
    x = torch.randn(3, c0, rng.choice([10, 11, 12]),
                    rng.choice([10, 12]), generator=g, dtype=torch.float64)
    return net, x


@pytest.mark.parametrize("seed", range(40))
def test_onepass_matches_jvp_on_random_graphs(seed):
    net, x = random_graph(seed)
    agree(net, x, seed=seed)


# ---- 3. distance between two near-equal deltas -------------------------------------------------

@pytest.mark.parametrize("dtype,eps", [(torch.float64, 1e-8), (torch.float32, 1e-7)])
def test_delta_distance_of_near_equal_deltas_is_exact(dtype, eps):
    """Old code: sqrt(|a|^2 + |b|^2 - 2 a.b) gave 0.0 (float64, 1e-8 apart) or a wrong value."""
    g = torch.Generator().manual_seed(0)
    da = {"0.a.weight": torch.randn(50, 40, generator=g, dtype=dtype), "0.a.bias": torch.randn(40, generator=g, dtype=dtype)}
    db = {n: t * (1 + eps) + eps * torch.randn(t.shape, generator=g, dtype=dtype) for n, t in da.items()}
    rows = {(r["level"], r["layer"]): r for r in delta_comparison(da, db)}
    for (level, layer), r in rows.items():
        names = list(da) if level != "param" else [layer]
        want = math.sqrt(sum(float(((da[n].double() - db[n].double()) ** 2).sum()) for n in names))
        assert want > 0
        assert abs(r["distance"] - want) <= 1e-12 * want, (level, layer, r["distance"], want)
    assert rows[("total", "total")]["distance"] > 0
