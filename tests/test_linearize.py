"""The Taylor model against independent computations, in float64 (issue: Foundation, section 4)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from linft.core import DropoutHead, freeze_batchnorm, linearize
from linft.errors import LinearizationError
from conftest import tiny_split, trunk_features


def _displace(lin, scale, seed=1):
    """Set theta = theta0 + scale * d for a fixed random direction d; returns d."""
    g = torch.Generator().manual_seed(seed)
    d = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in lin.theta().items()}
    t0 = lin.theta0.as_dict()
    with torch.no_grad():
        for n, p in lin.theta().items():
            p.copy_(t0[n] + scale * d[n])
    return d


@pytest.fixture(params=["basic", "bottleneck"])
def tail_head(request):
    _, sp = tiny_split(block=request.param, k=2, p=0.0)
    model = sp.tail_head().eval()
    return model, trunk_features(sp)


def test_equals_f_at_theta0(tail_head):
    model, h = tail_head
    lin = linearize(model).eval()
    assert (lin(h) - model(h)).abs().max().item() <= 1e-12


def test_equals_f_at_theta0_with_dropout_same_mask():
    _, sp = tiny_split(k=2, p=0.5)
    model = freeze_batchnorm(sp.tail_head()).train()
    h = trunk_features(sp)
    lin = linearize(model).train()
    torch.manual_seed(3)
    a = lin(h)
    torch.manual_seed(3)
    b = model(h)
    assert (a - b).abs().max().item() <= 1e-12


def test_exact_for_module_linear_in_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.Flatten(), nn.LazyLinear(3)).double()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    model(x)  # materialise the lazy layer
    model = nn.Sequential(model[0], model[1], nn.Linear(model[2].in_features, 3).double())
    # conv -> flatten -> linear is bilinear in (conv, linear) weights: linearize the linear layer alone
    head = DropoutHead(4, 3, p=0.0).double()
    lin = linearize(head).eval()
    _displace(lin, 0.7)
    feats = torch.randn(5, 4, 2, 2, dtype=torch.float64)
    assert (lin(feats) - lin.nonlinear(feats)).abs().max().item() <= 1e-12
    conv_only = nn.Conv2d(3, 4, 3).double()
    lin = linearize(conv_only)
    _displace(lin, 2.0)
    assert (lin(x) - lin.nonlinear(x)).abs().max().item() <= 1e-12


def _residual_ratios(model, h, scales=(2e-3, 1e-3, 5e-4)):
    lin = linearize(model).eval()
    gaps = []
    for scale in scales:
        _displace(lin, scale)
        gaps.append((lin(h) - lin.nonlinear(h)).norm().item())
    assert gaps[-1] > 0
    return [big / small for big, small in zip(gaps, gaps[1:])]


def _smooth(module):
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.GELU())
        else:
            _smooth(child)
    return module


def test_residual_is_second_order(tail_head):
    """|f - f_lin| falls 4x when the displacement halves (smooth activations)."""
    model, h = tail_head
    for ratio in _residual_ratios(_smooth(model), h):
        assert 3.8 < ratio < 4.2


def test_relu_residual_is_superlinear(tail_head):
    """With ReLU kinks the L2 residual scales as |delta|^1.5 (a fraction ~|delta| of units switch,
    each off by ~|delta|), so halving gives ~2.8x; still far from a first-order error (2x)."""
    model, h = tail_head
    h = torch.cat([h] * 8) + 0.1 * torch.randn(8 * h.shape[0], *h.shape[1:], dtype=h.dtype)
    ratios = _residual_ratios(model, h)
    assert all(2.4 < r < 4.4 for r in ratios), ratios


def test_tangent_matches_forward_ad_and_finite_differences(tail_head):
    model, h = tail_head
    lin = linearize(model).eval()
    d = _displace(lin, 1.0)
    _, tangent = lin.taylor_terms(h)
    theta0 = lin.theta0.as_dict()
    buffers = dict(model.named_buffers())
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = {n: fwAD.make_dual(theta0[n], d[n]) for n in theta0}
        out = functional_call(model, {**buffers, **dual}, (h,))
        fwd = fwAD.unpack_dual(out).tangent
    assert torch.allclose(tangent, fwd, rtol=1e-12, atol=1e-12)
    eps = 1e-6
    plus = functional_call(model, {**buffers, **{n: theta0[n] + eps * d[n] for n in d}}, (h,))
    minus = functional_call(model, {**buffers, **{n: theta0[n] - eps * d[n] for n in d}}, (h,))
    fd = (plus - minus) / (2 * eps)
    assert torch.allclose(tangent, fd, rtol=1e-6, atol=1e-7)


def test_gradient_is_vjp_at_theta0(tail_head):
    """f_lin is affine in theta, so dL/dtheta = J(theta0)^T dL/df: one ordinary backward at theta0."""
    model, h = tail_head
    lin = linearize(model).eval()
    _displace(lin, 0.3)
    y = torch.tensor([0, 1, 2, 3])
    out = lin(h)
    loss = F.cross_entropy(out, y)
    grads = torch.autograd.grad(loss, list(lin.theta().values()))
    o = out.detach().requires_grad_()
    (g_out,) = torch.autograd.grad(F.cross_entropy(o, y), [o])
    theta0 = {n: t.clone().requires_grad_() for n, t in lin.theta0.as_dict().items()}
    f0 = functional_call(model, {**dict(model.named_buffers()), **theta0}, (h,))
    ref = torch.autograd.grad(f0, list(theta0.values()), g_out)
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_dropout_head_is_linearized_to_first_order():
    """W0 (m*Phi_lin) + dW (m*Phi0) + b0 + db, with the one mask shared by both streams."""
    _, sp = tiny_split(k=2, p=0.5)
    model = freeze_batchnorm(sp.tail_head()).train()
    h = trunk_features(sp)
    lin = linearize(model).train()
    d = _displace(lin, 0.2)
    torch.manual_seed(7)
    out = lin(h)
    torch.manual_seed(7)
    n_units = sp.head.fc.in_features
    mask = F.dropout(torch.ones(h.shape[0], n_units, dtype=h.dtype), 0.5, True)
    t0 = lin.theta0.as_dict()
    tail_names = [n for n in t0 if n.startswith("0.")]
    buffers = {n[2:]: b for n, b in model.named_buffers() if n.startswith("0.")}
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = {n[2:]: fwAD.make_dual(t0[n], 0.2 * d[n]) for n in tail_names}
        z = functional_call(sp.tail, {**buffers, **dual}, (h,))
        z = fwAD.unpack_dual(z)
    phi0, dphi = z.primal.mean((2, 3)), z.tangent.mean((2, 3))
    w0, b0 = t0["1.fc.weight"], t0["1.fc.bias"]
    dw, db = 0.2 * d["1.fc.weight"], 0.2 * d["1.fc.bias"]
    expected = F.linear(mask * (phi0 + dphi), w0) + F.linear(mask * phi0, dw) + b0 + db
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert 0.3 < (mask == 0).double().mean().item() < 0.7


def test_zero_head_gives_tail_no_gradient():
    _, sp = tiny_split(k=2, p=0.0)
    nn.init.zeros_(sp.head.fc.weight)
    lin = linearize(sp.tail_head()).eval()
    h = trunk_features(sp)
    F.cross_entropy(lin(h), torch.tensor([0, 1, 2, 3])).backward()
    tail_grad = sum(p.grad.abs().sum() for n, p in lin.named_parameters() if n.startswith("0.") and p.grad is not None)
    assert tail_grad == 0
    assert lin.get_parameter("1.fc.weight").grad.abs().sum() > 0


def test_names_state_dict_and_no_mutation(tail_head):
    model, h = tail_head
    before = copy.deepcopy(model.state_dict())
    lin = linearize(model)
    assert [n for n, _ in lin.named_parameters()] == [n for n, _ in model.named_parameters()]
    _displace(lin, 0.5)
    lin.train()
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    lin2 = linearize(model)
    lin2.load_state_dict(lin.state_dict())
    assert torch.equal(lin2.eval()(h), lin.eval()(h))
    # theta0 is part of the saved state: a model linearized elsewhere loads its own expansion point
    assert any(k.startswith("theta0.") for k in lin.state_dict())


def test_batchnorm_policy_errors():
    _, sp = tiny_split(k=1)
    lin = linearize(sp.tail_head())
    lin.train()  # allowed: BatchNorm stays frozen
    h = trunk_features(sp)
    lin(h)
    bn = next(m for m in lin.modules() if isinstance(m, nn.BatchNorm2d))
    nn.Module.train(bn, True)  # bypass the freeze
    with pytest.raises(LinearizationError, match="train mode"):
        lin(h)
    with pytest.raises(LinearizationError, match="running statistics"):
        linearize(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)))
    with pytest.raises(LinearizationError, match="no trainable"):
        linearize(nn.ReLU())


def test_params0_sets_the_expansion_point(tail_head):
    model, h = tail_head
    other = {n: p.detach() + 0.01 for n, p in model.named_parameters()}
    lin = linearize(model, params0=other).eval()
    ref = functional_call(model, {**dict(model.named_buffers()), **other}, (h,))
    assert torch.allclose(lin(h), ref, rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast():
    _, sp = tiny_split(k=2, p=0.9, dtype=torch.float32)
    lin = linearize(sp.tail_head()).cuda().train()
    h = trunk_features(sp, dtype=torch.float32).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = lin(h)
        loss = F.cross_entropy(out.float(), torch.tensor([0, 1, 2, 3], device="cuda"))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lin.parameters() if p.requires_grad)
