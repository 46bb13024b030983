"""Multi-process runs (issue #8, part 2-3): 2 CPU processes on gloo equal one process with the same
global batch and seed, for the standard and the linearized modes, also when resuming a checkpoint
written by another world size; per-example dropout masks and rank shares are exact."""
import json

import pytest
import torch
import torch.nn.functional as F

from linft.runs.config import RunConfig
from linft.data.synthetic import make_image_tree
from linft.training.distributed import _GlobalDropout, local_rows
from linft.training.launch import spawn_train
from linft.runs.store import RunDir, load_checkpoint
from linft.training.launch import train
from linft.training.trainer import Trainer

TOL = 1e-6  # float32 weights: only the order of the reductions differs (observed <= 7e-8)


def tiny(data_root, **kw):
    # batch_size 5 over 2 ranks: unequal shares (3 + 2 per domain), so the loss must be the global mean
    base = dict(dataset="PACS", data_root=str(data_root), backbone="tiny_resnet", k=2, resolution=16, p=0.5,
                steps=6, eval_every=3, traj_start=1, lr_decay_steps=(4,), batch_size=5, lr=0.05, quiet=True)
    base.update(kw)
    return RunConfig(**base)


def test_rank_shares_and_dropout_masks_are_the_single_process_ones():
    rows = [local_rows(5, 3, r, 2) for r in range(2)]
    assert sorted(torch.cat(rows).tolist()) == list(range(15))
    assert rows[1].tolist() == [1, 3, 6, 8, 11, 13]
    x = torch.randn(15, 7)
    torch.manual_seed(3)
    ref = F.dropout(x, 0.5, True)
    after = torch.rand(1)
    for r in range(2):
        torch.manual_seed(3)
        with _GlobalDropout(rows[r], 15):
            got = F.dropout(x[rows[r]], 0.5, True)
        assert torch.equal(got, ref[rows[r]])
        assert torch.equal(torch.rand(1), after)  # the generator advanced as in one process


class _Stop(Exception):
    pass


def _interrupted(cfg, root):
    """Train ``cfg`` in one process and stop it at step 3 (its checkpoint is at step 2)."""
    tr = Trainer(cfg.replace(checkpoint_every=2), root)
    real = tr._evaluate

    def evaluate(step):
        if step == 3:
            raise _Stop
        return real(step)
    tr._evaluate = evaluate
    with pytest.raises(_Stop):
        tr.run()
    assert load_checkpoint(RunDir(root, cfg).checkpoint_path)["step"] == 2


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    data = tmp_path / "data"
    make_image_tree(data, "PACS", n_per_class=5, size=16)
    cfgs = [tiny(data, mode="tail"), tiny(data, mode="linear"), tiny(data, mode="full")]
    for c in cfgs:
        train(c, tmp_path / "one")
    _interrupted(cfgs[1], tmp_path / "two")  # the 2-process linear run resumes a 1-process checkpoint
    spawn_train(cfgs, tmp_path / "two", world_size=2)
    for c in cfgs:
        a, b = RunDir(tmp_path / "one", c), RunDir(tmp_path / "two", c)
        assert b.done and not list(b.path.glob(".*"))  # rank 0 wrote, no stray temporary files
        wa, wb = load_checkpoint(a.final_path), load_checkpoint(b.final_path)
        for part in ("trainable", "traj_avg"):
            assert wa[part].keys() == wb[part].keys()
            for k in wa[part]:
                assert torch.allclose(wa[part][k], wb[part][k], rtol=0, atol=TOL), (c.mode, part, k)
        ra = [r for r in a.read_rows() if r.get("metric") != "img_per_s"]
        rb = [r for r in b.read_rows() if r.get("metric") != "img_per_s"]
        assert len(ra) == len(rb) and len(ra) > 100
        for x, y in zip(ra, rb):
            assert {k: v for k, v in x.items() if k != "value"} == {k: v for k, v in y.items() if k != "value"}
            assert x["value"] == pytest.approx(y["value"], abs=1e-5), (c.mode, x)
        assert json.loads((b.path / "config.json").read_text())["mode"] == c.mode
