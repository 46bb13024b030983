"""Pure-torch analysis pieces (linft.core.params / connectivity / fidelity / ntk) on closed forms."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from conftest import tiny_split, trunk_features
from linft.core import DropoutHead, linearize
from linft.core.connectivity import barrier, chord_excess, refine_max, uniform_grid
from linft.core.fidelity import fidelity, halving_ratio, r2
from linft.core.ntk import empirical_ntk, kernel_distance, label_alignment, trace_form
from linft.core.params import block_of, delta_comparison, differing, lerp, weight_distance


# -- params ----------------------------------------------------------------------------------------
def test_weight_distance_per_tensor_block_total():
    theta0 = {"0.layer4_0.conv1.weight": torch.zeros(2), "0.layer4_0.bn1.bias": torch.tensor([1.0]),
              "1.fc.weight": torch.tensor([[3.0]])}
    theta = {"0.layer4_0.conv1.weight": torch.tensor([3.0, 4.0]), "0.layer4_0.bn1.bias": torch.tensor([1.0]),
             "1.fc.weight": torch.tensor([[3.0 + 12.0]])}
    rows = {(r["level"], r["layer"]): r for r in weight_distance(theta, theta0)}
    assert rows[("param", "0.layer4_0.conv1.weight")]["distance"] == 5.0
    assert math.isnan(rows[("param", "0.layer4_0.conv1.weight")]["relative"])  # |theta0| = 0
    assert rows[("block", "0.layer4_0")]["distance"] == 5.0 and rows[("block", "0.layer4_0")]["norm0"] == 1.0
    assert rows[("block", "1.fc")]["relative"] == 4.0
    assert rows[("total", "total")]["distance"] == 13.0 and rows[("total", "total")]["numel"] == 4
    assert rows[("total", "total")]["norm0"] == pytest.approx(math.sqrt(10))
    assert block_of("fc.weight") == "fc" and block_of("2.fc.bias") == "2.fc" and block_of("w") == "w"


def test_delta_comparison_cosine_and_distance():
    da = {"a.x": torch.tensor([1.0, 0.0]), "b.y": torch.tensor([0.0])}
    db = {"a.x": torch.tensor([1.0, 1.0]), "b.y": torch.tensor([0.0])}
    rows = {(r["level"], r["layer"]): r for r in delta_comparison(da, db)}
    assert rows[("total", "total")]["cosine"] == pytest.approx(1 / math.sqrt(2))
    assert rows[("total", "total")]["distance"] == pytest.approx(1.0)
    assert math.isnan(rows[("param", "b.y")]["cosine"])
    assert differing(da, db) == ["a.x"] and differing(da, da) == []


def test_lerp_exact_endpoints_and_no_mutation():
    a = {"w": torch.randn(3)}
    b = {"w": torch.randn(3)}
    a_copy, b_copy = a["w"].clone(), b["w"].clone()
    assert lerp(a, b, 0)["w"] is a["w"] and lerp(a, b, 1.0)["w"] is b["w"]
    assert torch.allclose(lerp(a, b, 0.25)["w"], 0.75 * a["w"] + 0.25 * b["w"])
    assert torch.equal(a["w"], a_copy) and torch.equal(b["w"], b_copy)


# -- connectivity ----------------------------------------------------------------------------------
class OneParam(nn.Module):
    """A 1-parameter 'model' whose loss is w (1 - w) + c w: on the path w = a, L(a) = a (1 - a) + c a."""

    def __init__(self, c=0.0):
        super().__init__()
        self.w, self.c = nn.Parameter(torch.tensor(0.0, dtype=torch.float64)), c

    def forward(self):
        return self.w * (1 - self.w) + self.c * self.w


@pytest.mark.parametrize("c, line, mean", [(0.0, 0.25, 0.25), (1.0, 0.25, 0.5)])
def test_barrier_of_a_known_curve(c, line, mean):
    model = OneParam(c)
    A, B = {"w": torch.tensor(0.0, dtype=torch.float64)}, {"w": torch.tensor(1.0, dtype=torch.float64)}
    curve = {a: float(functional_call(model, lerp(A, B, a), ())) for a in uniform_grid(11)}
    assert curve[0.0] == 0.0 and curve[1.0] == c
    b_line, at_line = barrier(curve, "line")
    b_mean, at_mean = barrier(curve, "mean")
    assert b_line == pytest.approx(line, abs=1e-12) and at_line == 0.5
    assert b_mean == pytest.approx(mean, abs=1e-12)
    assert at_mean == (0.5 if c == 0 else 1.0)
    assert float(model.w.detach()) == 0.0  # the model read was not touched


def test_grid_endpoints_and_refinement_finds_a_sharp_peak():
    g = uniform_grid(11)
    assert g[0] == 0.0 and g[-1] == 1.0 and len(g) == 11
    peak = 0.537

    def score(a):
        return math.exp(-((a - peak) / 0.01) ** 2)
    pts = refine_max(score, {a: score(a) for a in g}, min_spacing=1 / 80)
    best = max(pts, key=pts.get)
    assert abs(best - peak) < 1 / 80 and pts[best] > 0.9
    assert max(score(a) for a in g) < 0.01  # the grid alone misses it
    alphas = sorted(pts)
    i = alphas.index(best)
    assert alphas[i + 1] - alphas[i] < 1 / 80 and alphas[i] - alphas[i - 1] < 1 / 80
    with pytest.raises(ValueError):
        barrier({0.0: 1.0, 0.5: 2.0}, "line")


# -- fidelity --------------------------------------------------------------------------------------
def test_fidelity_closed_forms():
    f0 = torch.randn(20, 5, dtype=torch.float64)
    d, q = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64)
    s = fidelity(f0 + d, f0 + d, f0)
    assert s["r2"] == 1.0 and s["agreement"] == 1.0 and s["rel_err_l2"] == 0.0 and s["residual_l1"] == 0.0
    # f(t) = f0 + t d + t^2 q, f_lin(t) = f0 + t d: residual t^2 |q|, halving ratio exactly 4
    res = {t: fidelity(f0 + t * d + t * t * q, f0 + t * d, f0) for t in (1.0, 0.5)}
    assert halving_ratio(res[1.0]["residual_l2"], res[0.5]["residual_l2"]) == pytest.approx(4.0)
    assert halving_ratio(res[1.0]["residual_l1"], res[0.5]["residual_l1"]) == pytest.approx(4.0)
    assert res[1.0]["rel_err_l2"] == pytest.approx(float(q.norm() / (d + q).norm()))
    assert r2(f0, f0 + 1e9) < 0


def test_taylor_residual_is_zero_for_a_model_linear_in_its_parameters():
    head = DropoutHead(6, 3, p=0.9).double().eval()
    lin = linearize(head)
    theta0 = {n: p.detach().clone() for n, p in head.named_parameters()}
    theta = {n: t + torch.randn_like(t) for n, t in theta0.items()}
    z = torch.randn(10, 6, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        f = functional_call(head, theta, (z,))
        g = functional_call(lin.eval(), theta, (z,))
        f0 = head(z)
    s = fidelity(f, g, f0)
    assert s["rel_err_l2"] < 1e-13 and s["r2"] == pytest.approx(1.0, abs=1e-13) and s["agreement"] == 1.0


def test_halving_ratio_is_four_for_a_smooth_network():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    lin = linearize(net)
    theta0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    d = {n: 0.05 * torch.randn_like(t) for n, t in theta0.items()}
    x = torch.randn(50, 4, dtype=torch.float64)
    res = {}
    with torch.no_grad():
        for t in (1.0, 0.5):
            th = {n: theta0[n] + t * d[n] for n in theta0}
            res[t] = fidelity(functional_call(net, th, (x,)), functional_call(lin, th, (x,)), net(x))
    assert 3.7 < halving_ratio(res[1.0]["residual_l2"], res[0.5]["residual_l2"]) < 4.3


# -- ntk -------------------------------------------------------------------------------------------
def brute_force_jacobian(module, params, x):
    names = list(params)
    ps = [params[n].detach().clone().requires_grad_(True) for n in names]
    rows = []
    for i in range(x.shape[0]):
        out = functional_call(module, dict(zip(names, ps)), (x[i:i + 1],))[0]
        per_c = []
        for c in range(out.shape[0]):
            g = torch.autograd.grad(out[c], ps, retain_graph=True, allow_unused=True)
            per_c.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(g, ps)]))
        rows.append(torch.stack(per_c))
    return torch.stack(rows)  # [N, C, P]


@pytest.mark.parametrize("method, chunk", [("jacobian", None), ("jacobian", 2), ("ntvp", 2)])
def test_ntk_matches_brute_force_float64(method, chunk):
    _, sp = tiny_split(k=1, p=0.5, num_classes=3)
    th = sp.tail_head().eval()
    z = trunk_features(sp, n=5)
    params = {n: p.detach() for n, p in th.named_parameters()}

    def fn(p, x):
        return functional_call(th, p, (x,))
    j = brute_force_jacobian(th, params, z)
    full = torch.einsum("icp,jdp->icjd", j, j)
    k_full = empirical_ntk(fn, params, z, form="full", method=method, chunk=chunk)
    k_trace = empirical_ntk(fn, params, z, form="trace", method=method, chunk=chunk)
    scale = float(full.abs().max())
    assert k_full.shape == (5, 3, 5, 3) and k_trace.shape == (5, 5)
    assert float((k_full - full).abs().max()) < 1e-12 * scale
    assert float((k_trace - trace_form(full)).abs().max()) < 1e-12 * scale
    assert torch.allclose(k_trace, k_trace.T)
    for n, p in th.named_parameters():
        assert torch.equal(p, params[n])  # nothing mutated


def test_ntk_of_a_linear_layer_is_closed_form_and_constant():
    lin = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    p0 = {n: p.detach() for n, p in lin.named_parameters()}
    p1 = {n: t + torch.randn_like(t) for n, t in p0.items()}

    def fn(p, xb):
        return functional_call(lin, p, (xb,))
    k0, k1 = empirical_ntk(fn, p0, x), empirical_ntk(fn, p1, x)
    expected = 3 * (x @ x.T + 1)  # sum over 3 outputs of (x_i . x_j + 1)
    assert torch.allclose(k0, expected, atol=1e-12) and kernel_distance(k0, k1) == pytest.approx(0.0, abs=1e-15)
    assert kernel_distance(k0, 2 * k0) == pytest.approx(0.0, abs=1e-15)
    assert kernel_distance(k0, torch.eye(6, dtype=torch.float64)) > 0.1
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    assert -1 <= label_alignment(k0, y, 3) <= 1


def test_ntk_of_a_linearized_module_does_not_move():
    _, sp = tiny_split(k=1, p=0.5, num_classes=3)
    lin = linearize(sp.tail_head().eval()).eval()
    z = trunk_features(sp, n=4)
    p0 = {n: p.detach() for n, p in lin.named_parameters()}
    p1 = {n: t + 0.3 * torch.randn_like(t) for n, t in p0.items()}

    def fn(p, x):
        return functional_call(lin, p, (x,))
    k0, k1 = empirical_ntk(fn, p0, z), empirical_ntk(fn, p1, z, chunk=3)
    assert kernel_distance(k0, k1) == pytest.approx(0.0, abs=1e-14)
    assert float((k0 - k1).abs().max()) < 1e-12 * float(k0.abs().max())
    # while the network's own kernel does move
    net = sp.tail_head().eval()

    def gn(p, x):
        return functional_call(net, p, (x,))
    assert kernel_distance(empirical_ntk(gn, p0, z), empirical_ntk(gn, p1, z)) > 1e-6


# -- identities of linearized models ---------------------------------------------------------------
def _two_linearized_endpoints(scale):
    _, sp = tiny_split(k=2, p=0.9, num_classes=4)
    module = sp.tail_head().eval()
    lin = linearize(module).eval()
    p0 = {n: p.detach().clone() for n, p in lin.named_parameters()}
    pa = {n: t + scale * torch.randn_like(t) for n, t in p0.items()}
    pb = {n: t + scale * torch.randn_like(t) for n, t in p0.items()}
    return module, lin, pa, pb, trunk_features(sp, n=12)


def test_ensemble_equals_averaged_weights_and_path_is_convex_for_linearized_models():
    module, lin, pa, pb, z = _two_linearized_endpoints(0.3)
    y = torch.randint(0, 4, (12,))
    with torch.no_grad():
        fa, fb = functional_call(lin, pa, (z,)), functional_call(lin, pb, (z,))
        fm = functional_call(lin, lerp(pa, pb, 0.5), (z,))
        assert float((fm - (fa + fb) / 2).abs().max()) < 1e-12 * float(fa.abs().max())
        curve = {a: F.cross_entropy(functional_call(lin, lerp(pa, pb, a), (z,)), y).item() for a in uniform_grid(81)}
    b_line, _ = barrier(curve, "line")
    assert b_line <= 1e-12  # the endpoints give 0; no interior point lies above the chord
    assert max(v for a, v in chord_excess(curve).items() if 0 < a < 1) <= 1e-12
    alphas = sorted(curve)
    second = [curve[alphas[i - 1]] - 2 * curve[alphas[i]] + curve[alphas[i + 1]] for i in range(1, len(alphas) - 1)]
    assert min(second) >= -1e-12
    # the nonlinear network at the same parameters departs from both identities
    with torch.no_grad():
        ga, gb = functional_call(module, pa, (z,)), functional_call(module, pb, (z,))
        gm = functional_call(module, lerp(pa, pb, 0.5), (z,))
    assert float((gm - (ga + gb) / 2).norm() / ((ga - gb) / 2).norm()) > 1e-4
