"""A fixed config trains to bit-identical weights and rows across restructurings of the package.

``tests/data/identity_golden.json`` was written by this file's ``_record()`` with the code before the
package was split into layered subpackages (commit 1032bc6); any change that alters what a run
computes must say so and re-record it on purpose (``python tests/test_refactor_identity.py``).
"""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "data" / "identity_golden.json"
CASES = {
    "tail_probe": dict(mode="tail", p=0.5, head_init="probe", probe_steps=3),
    "linear": dict(mode="linear", p=0.5),
    "full": dict(mode="full", p=0.0),
    "unfolded": dict(mode="unfolded", p=0.5, k=3),
}


def _config(data_root, **kw):
    from linft.runs.config import RunConfig
    base = dict(dataset="PACS", data_root=str(data_root), backbone="tiny_resnet", k=2, resolution=16,
                steps=6, eval_every=3, traj_start=1, lr_decay_steps=(4,), batch_size=4, lr=0.05, quiet=True)
    base.update(kw)
    return RunConfig(**base)


def _fingerprint(data_root, out_root, case: str) -> dict:
    from linft.training.launch import train
    torch.manual_seed(0)
    rd = train(_config(data_root, **CASES[case]), out_root)
    final = torch.load(rd.path / "final.pt", map_location="cpu", weights_only=True)
    weights = {f"{part}/{n}": hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]
               for part, sd in final.items() for n, t in sorted(sd.items())}
    rows = [r for r in rd.read_rows() if r.get("metric") != "img_per_s"]
    blob = json.dumps(rows, sort_keys=True).encode()
    return {"run_id": rd.path.name, "weights": weights, "rows_sha256": hashlib.sha256(blob).hexdigest(),
            "n_rows": len(rows)}


def _tree(root: Path) -> Path:
    from linft.data.synthetic import make_image_tree
    make_image_tree(root, "PACS", n_per_class=5, size=16)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return _tree(tmp_path_factory.mktemp("identity-data"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixed_config_is_bit_identical_to_the_recorded_run(data_root, tmp_path, case):
    golden = json.loads(GOLDEN.read_text())[case]
    got = _fingerprint(data_root, tmp_path, case)
    assert got["run_id"] == golden["run_id"]
    assert got["weights"] == golden["weights"]
    assert got["n_rows"] == golden["n_rows"]
    assert got["rows_sha256"] == golden["rows_sha256"]


def _record() -> None:
    import tempfile
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        root = _tree(Path(d) / "data")
        out = {case: _fingerprint(root, Path(d) / "runs", case) for case in sorted(CASES)}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _record()
