"""Vectorised multi-run training equals K separate runs (issue #7, part 3)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_split, trunk_features
from linft.core import linearize
from linft.training.multirun import Member, MultiRun, make_member_module

MEMBERS = [Member(seed=0, p=0.5, lr=0.1), Member(seed=1, p=0.0, lr=0.05, weight_decay=1e-2),
           Member(seed=2, p=0.9, lr=0.2, weight_decay=5e-4)]
STEPS, B = 4, 6
KW = dict(momentum=0.9, head_lr_mult=2.0, lr_decay_steps=(2,), lr_decay=0.5)


def _data(dtype, n=12):
    _, sp = tiny_split(k=2, dtype=dtype)
    feats = trunk_features(sp, n=n, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 5, (n,), generator=g)
    order = torch.randint(0, n, (STEPS, len(MEMBERS), B), generator=g)  # per-member data order
    return sp, feats, labels, order


def _run_vectorised(sp, feats, labels, order, linearized=False):
    mr = MultiRun(sp.tail, sp.head.fc.in_features, 5, MEMBERS, linearized=linearized, **KW)
    losses = [mr.step(feats[order[t]], labels[order[t]]) for t in range(STEPS)]
    return mr, torch.stack(losses)


def _run_sequential(sp, feats, labels, order, linearized=False):
    out, losses = [], []
    for k, m in enumerate(MEMBERS):
        mr = MultiRun(sp.tail, sp.head.fc.in_features, 5, [m], linearized=linearized, **KW)
        losses.append(torch.cat([mr.step(feats[order[t, k]][None], labels[order[t, k]][None])
                                 for t in range(STEPS)]))
        out.append(mr.state_dict_of(0))
    return out, torch.stack(losses, 1)


@pytest.mark.parametrize("linearized", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_vectorised_equals_sequential(dtype, tol, linearized):
    sp, feats, labels, order = _data(dtype)
    mr, lv = _run_vectorised(sp, feats, labels, order, linearized)
    seq, ls = _run_sequential(sp, feats, labels, order, linearized)
    assert torch.allclose(lv, ls, atol=tol, rtol=0)
    moved = 0.0
    for k in range(len(MEMBERS)):
        sd = mr.state_dict_of(k)
        for n, v in seq[k].items():
            assert torch.allclose(sd[n], v, atol=tol, rtol=tol), (k, n)
        moved += (sd["tail.layer4_1.conv1.weight"] - sp.tail.layer4_1.conv1.weight).abs().max().item()
    assert moved > 1e-4  # the tails did train


def test_one_member_equals_plain_torch_sgd():
    """The stacked SGD (momentum, per-member weight decay, head lr multiplier, MultiStepLR) and the
    explicit masks reproduce a plain PyTorch training loop with the same masks."""
    sp, feats, labels, order = _data(torch.float64)
    m = MEMBERS[2]
    mr = MultiRun(sp.tail, sp.head.fc.in_features, 5, [m], **KW)
    ref = make_member_module(sp.tail, sp.head.fc.in_features, 5, m)
    opt = torch.optim.SGD([{"params": ref.tail.parameters(), "lr": m.lr},
                           {"params": ref.head.parameters(), "lr": m.lr * KW["head_lr_mult"]}],
                          lr=m.lr, momentum=0.9, weight_decay=m.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2], 0.5)
    gen = torch.Generator().manual_seed(0)
    for t in range(STEPS):
        x, y = feats[order[t, 0]], labels[order[t, 0]]
        masks = (torch.rand(1, B, 16, generator=gen, dtype=torch.float64) >= m.p).double() / (1 - m.p)
        mr.step(x[None], y[None], masks=masks)
        loss = F.cross_entropy(ref(x, masks[0]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    sd = mr.state_dict_of(0)
    for n, p in ref.named_parameters():
        assert torch.allclose(sd[n], p, atol=1e-12), n


def test_linearized_member_matches_linearized_module():
    sp, feats, labels, order = _data(torch.float64)
    m = Member(seed=3, p=0.0, lr=0.1)
    mr = MultiRun(sp.tail, sp.head.fc.in_features, 5, [m], linearized=True, momentum=0.0)
    for t in range(2):
        mr.step(feats[order[t, 0]][None], labels[order[t, 0]][None])
    base = make_member_module(sp.tail, sp.head.fc.in_features, 5, m)
    lin = linearize(nn.Sequential(base.tail, base.head)).eval()
    sd = mr.state_dict_of(0)
    with torch.no_grad():
        for n, p in lin.named_parameters():
            p.copy_(sd[n.replace("0.", "tail.", 1) if n.startswith("0.") else "head." + n[2:]])
    ones = torch.ones(1, len(feats), 16, dtype=torch.float64)
    got = mr.logits(feats, ones)[0]
    assert torch.allclose(got, lin(feats), atol=1e-10)
    assert not torch.allclose(got, lin.reference(feats), atol=1e-6)  # and it moved away from theta0


def test_member_masks_independent_of_other_members():
    sp, feats, labels, _ = _data(torch.float64)
    a = MultiRun(sp.tail, 16, 5, MEMBERS).masks(B)
    b = MultiRun(sp.tail, 16, 5, MEMBERS[1:]).masks(B)
    assert torch.equal(a[1:], b)
    assert ((a[2] == 0).double().mean() - 0.9).abs() < 0.1
