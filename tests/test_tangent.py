"""The one-pass (primal, tangent) engine against the torch.func.jvp reference (float64)."""
import copy

import pytest
import torch
import torch.nn as nn

from linft.models.backbones import TinyResNet, build_backbone
from linft.core import freeze_batchnorm, linearize, split_network
from linft.core.tangent import build_primal_cache, onepass_terms
from linft.core.tangent_rules import _fallback, rule_for
from linft.errors import LinearizationError

TOL = 1e-12


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def perturb(*mods, scale=0.02, seed=1):
    """theta = theta0 + the same random delta in each module (parameters in the same order)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ps in zip(*(list(m.parameters()) for m in mods)):
            d = scale * torch.randn(ps[0].shape, generator=g, dtype=ps[0].dtype)
            for p in ps:
                p.add_(d)


def compare(module, x, seed=3, train=True):
    """Outputs (f0, df) and gradients w.r.t. theta of the two engines agree to TOL."""
    module = module.double()
    lj, lo = linearize(module), linearize(module, engine="onepass")
    perturb(lj, lo)
    lj.train(train), lo.train(train)
    torch.manual_seed(seed)
    f0j, dfj = lj.taylor_terms(x)
    torch.manual_seed(seed)
    f0o, dfo = lo.taylor_terms(x)
    assert rel(f0o, f0j) < TOL and rel(dfo, dfj) < TOL
    w = torch.randn_like(dfj)
    pj = [p for p in lj.parameters() if p.requires_grad]
    po = [p for p in lo.parameters() if p.requires_grad]
    gj = torch.autograd.grad(((f0j + dfj) * w).sum(), pj, allow_unused=True)
    go = torch.autograd.grad(((f0o + dfo) * w).sum(), po, allow_unused=True)
    for a, b in zip(go, gj):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            assert rel(a, b) < TOL
    return lj, lo


def tiny_split(block, k=2, p=0.5):
    torch.manual_seed(0)
    model = TinyResNet(block=block).double().eval()
    s = split_network(model, k, 5, p)
    with torch.no_grad():
        h = s.trunk(torch.randn(4, 3, 16, 16, dtype=torch.float64))
    return s, h


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_tiny_resnet_tail_matches_jvp_with_dropout(block):
    s, h = tiny_split(block)
    lj, lo = compare(s.tail_head(), h)
    lo.eval(), lj.eval()  # dropout off: deterministic, and the same
    assert rel(lo(h), lj(h)) < TOL


@pytest.fixture(scope="module")
def lite0():
    model, _ = build_backbone("efficientnet_lite0")  # real ImageNet weights and BN statistics
    return model.double().eval()


@pytest.mark.parametrize("k", [3, 16])  # k=16: DepthwiseSeparableConv and stride-2 Conv2dSame blocks too
def test_efficientnet_lite0_tail_matches_jvp(lite0, k):
    s = split_network(lite0, k, 4, 0.5)
    res = 64 if k == 3 else 24
    with torch.no_grad():
        h = s.trunk(torch.randn(2, 3, res, res, dtype=torch.float64))
    assert {type(m).__name__ for m in s.tail.modules()} >= {"InvertedResidual", "BatchNormAct2d"}
    compare(s.tail_head(), h)


def test_layers_zoo_matches_jvp():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True),
        nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=False),
        nn.BatchNorm2d(8, affine=False), nn.Hardtanh(-0.5, 0.7),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", groups=8),
        nn.Conv2d(8, 8, 3, padding="same", bias=False),
        nn.Dropout(0.3), nn.AvgPool2d(2), nn.Identity(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3),
    ).double()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    freeze_batchnorm(net)
    compare(net, torch.randn(5, 3, 12, 12, dtype=torch.float64))


class Odd(nn.Module):
    """A module the engine does not know: tanh(a * x) + b."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Parameter(torch.linspace(0.5, 1.5, c).view(1, c, 1, 1))
        self.b = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return torch.tanh(self.a * x) + self.b.view(1, -1, 1, 1)


def test_unknown_module_falls_back_to_jvp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Odd(4), nn.Conv2d(4, 4, 1), nn.Sequential(Odd(4))).double()
    assert rule_for(net[1]) is _fallback
    _, lo = compare(net, torch.randn(3, 3, 6, 6, dtype=torch.float64))
    c = build_primal_cache(lo, torch.randn(4, 3, 6, 6, dtype=torch.float64))  # fallback inside the cache
    f0, df = c.taylor_terms(torch.tensor([3, 1]))
    assert f0.shape == df.shape == (2, 4, 6, 6)


def test_frozen_parameters_have_zero_tangent():
    s, h = tiny_split("bottleneck")
    th = s.tail_head()
    for n, p in th.named_parameters():
        if "conv2" in n or n.endswith("bn3.bias") or n == "1.fc.bias":
            p.requires_grad_(False)
    compare(th, h)


def test_exact_at_theta0_and_standalone_api():
    s, h = tiny_split("basic", p=0.0)
    th = freeze_batchnorm(s.tail_head().double())
    params0 = {n: p.detach() for n, p in th.named_parameters()}
    f0, df = onepass_terms(th, h, params0, {})
    assert torch.equal(df, torch.zeros_like(df))
    assert rel(f0, th(h)) < TOL


def test_train_mode_batchnorm_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double().train()
    with pytest.raises(LinearizationError):
        onepass_terms(net, torch.randn(2, 3, 5, 5, dtype=torch.float64),
                      {n: p for n, p in net.named_parameters()}, {})
    with pytest.raises(LinearizationError):
        linearize(net, engine="bogus")


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_primal_cache_matches_jvp(block):
    s, h = tiny_split(block)
    th = s.tail_head().double()
    lj, lo = linearize(th), linearize(th, engine="onepass")
    perturb(lj, lo)
    lj.train(), lo.train()
    cache = build_primal_cache(lo, h, batch_size=3)  # two chunks
    assert cache.nbytes > 0 and cache.bytes_per_example == cache.nbytes / h.shape[0]
    for idx in (torch.tensor([3, 0, 2]), slice(1, 3)):
        torch.manual_seed(5)
        f0j, dfj = lj.taylor_terms(h[idx])
        torch.manual_seed(5)
        f0c, dfc = cache.taylor_terms(idx)
        assert rel(f0c, f0j) < TOL and rel(dfc, dfj) < TOL
        pj, pc = list(lj.parameters()), list(lo.parameters())
        for a, b in zip(torch.autograd.grad((f0c + dfc).square().sum(), pc),
                        torch.autograd.grad((f0j + dfj).square().sum(), pj)):
            assert rel(a, b) < TOL
    # float16 storage: half the bytes of the activations, first-order term still accurate to ~1e-3
    half = build_primal_cache(lo, h, store_dtype=torch.float16)
    assert half.nbytes < 0.7 * cache.nbytes
    lo.eval(), lj.eval()
    idx = torch.arange(4)
    assert rel(half.taylor_terms(idx)[1], lj.taylor_terms(h)[1]) < 5e-3
    assert rel(half(idx), lj(h)) < 5e-3


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 0, 1, 2), (1, 2, 2, 4)])
def test_fused_conv_tangent_gradients_are_exact(stride, padding, dilation, groups):
    """conv(dx, W0) + conv(h, dW) as one autograd node: float64 gradcheck against finite differences."""
    from linft.core.tangent_rules import _ConvTangent
    torch.manual_seed(0)
    dx = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    w0 = torch.randn(8, 4 // groups, 3, 3, dtype=torch.float64)
    dw = torch.randn(8, 4 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    conf = ((stride, stride), (padding, padding), (dilation, dilation), groups)
    assert torch.autograd.gradcheck(lambda a, b: _ConvTangent.apply(a, h, w0, b, conf), (dx, dw))
    # channels_last operands, and each operand alone (frozen weight: dW = None; constant input: dx = None)
    cl = dx.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _ConvTangent.apply(a, h, w0, b, conf), (cl, dw))
    assert torch.autograd.gradcheck(lambda a: _ConvTangent.apply(a, None, w0, None, conf), (dx,))
    assert torch.autograd.gradcheck(lambda b: _ConvTangent.apply(None, h, w0, b, conf), (dw,))


def test_tangent_stream_keeps_no_differentiable_tensor_for_backward():
    """Memory: the backward of the one-pass engine needs primal activations (h, BN xhat, ReLU masks)
    and theta0 only; keeping a tangent activation or a theta - theta0 would double the saved bytes."""
    s, h = tiny_split("bottleneck")
    lo = linearize(s.tail_head().double(), engine="onepass").train()
    perturb(lo)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lo(h)
    assert saved and not [tuple(t.shape) for t in saved if t.requires_grad]
    params = [p for p in lo.parameters()]
    grads = torch.autograd.grad(out.square().sum(), params)
    assert all(g is not None for g in grads)


def test_onepass_under_cpu_autocast_is_close_to_fp32():
    """The fused conv casts to the autocast dtype like autocast would (the CUDA bf16 path's logic)."""
    s, h = tiny_split("bottleneck")
    lo = linearize(s.tail_head().float(), engine="onepass").eval()
    perturb(lo, scale=0.05)
    x = h.float()
    ref = lo(x)
    g_ref = torch.autograd.grad(ref.square().sum(), list(lo.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lo(x)
    assert out.dtype == torch.bfloat16 or out.dtype == torch.float32
    assert rel(out.float(), ref) < 5e-2
    g = torch.autograd.grad(out.float().square().sum(), list(lo.parameters()))
    assert all(p.dtype == torch.float32 for p in g)
    assert rel(torch.cat([a.flatten() for a in g]), torch.cat([b.flatten() for b in g_ref])) < 5e-2


def test_in_place_primal_ops_never_touch_inputs_or_cached_values():
    """In-place ReLU (declared inplace) and BN-after-conv save activation-sized temporaries; the pass's
    input, and values the primal cache recorded (a dropout's input), must stay intact."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.ReLU(inplace=True), nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.Conv2d(6, 6, 3, padding=1), nn.Dropout(0.2), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4, affine=False), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, 3)).double()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    freeze_batchnorm(net)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    x_copy = x.clone()
    ref = copy.deepcopy(net)  # jvp cannot run in-place ops on its captured input: reference without them
    for m in ref.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    lj, lo = linearize(ref), linearize(net, engine="onepass")
    perturb(lj, lo)
    for mode in (True, False):
        lj.train(mode), lo.train(mode)
        torch.manual_seed(7)
        yj = lj(x)
        torch.manual_seed(7)
        yo = lo(x)
        assert rel(yo, yj) < TOL and torch.equal(x, x_copy)
        for a, b in zip(torch.autograd.grad(yo.square().sum(), list(lo.parameters())),
                        torch.autograd.grad(yj.square().sum(), list(lj.parameters()))):
            assert rel(a, b) < TOL
    cache = build_primal_cache(lo, x, batch_size=2)
    assert torch.equal(x, x_copy)
    lj.train(), lo.train()
    idx = torch.tensor([4, 1, 0])
    torch.manual_seed(9)
    yc = cache(idx)
    torch.manual_seed(9)
    assert rel(yc, lj(x[idx])) < TOL


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_onepass_and_primal_cache_on_device_under_bf16_autocast(device):
    """The training path as the trainer runs it (channels_last, bf16 autocast, fused conv node,
    primal cache) on ``device``, against the float64 jvp reference on CPU."""
    s, h = tiny_split("bottleneck", p=0.5)
    th = s.tail_head().double()
    ref = linearize(th)
    perturb(ref, scale=0.05)
    ref.eval()
    lin = linearize(th.float(), engine="onepass").to(device).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for a, b in zip(lin.parameters(), ref.parameters()):
            a.copy_(b)
    lin.eval()
    x = h.float().to(device).contiguous(memory_format=torch.channels_last)
    y = torch.arange(4, device=device) % 5
    expect = ref(h)
    g_ref = torch.autograd.grad(torch.nn.functional.cross_entropy(expect, y.cpu()), list(ref.parameters()))
    cache = build_primal_cache(lin, x)
    for fwd in (lambda: lin(x), lambda: cache(torch.arange(4, device=device))):
        with torch.autocast(device, dtype=torch.bfloat16):
            out = fwd()
            loss = torch.nn.functional.cross_entropy(out.float(), y)
        assert rel(out.double().cpu(), expect) < 5e-2
        g = torch.autograd.grad(loss, list(lin.parameters()))
        flat = torch.cat([a.double().cpu().flatten() for a in g])
        assert rel(flat, torch.cat([b.flatten() for b in g_ref])) < 5e-2
    # float32 without autocast: the fused node and the cache agree with the reference closely
    assert rel(lin(x).double().cpu(), expect) < 1e-4
    assert rel(cache(torch.arange(4, device=device)).double().cpu(), expect) < 1e-4
