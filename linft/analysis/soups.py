"""Baselines across finished runs ([ZB] Sec. 4; DiWA, model soups): uniform weight soup, greedy
soup ordered by training-domain validation accuracy, and the output ensemble of the final models.

Weight soups average the *trainable* parameters of runs that share an architecture and a split;
frozen BatchNorm statistics are shared. Rows (``kind="soup"``) land in
``<root>/_soups/<id>/rows.jsonl`` with the member list in ``config.json``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from linft.errors import LinftError
from linft.training.evaluate import metrics, predict
from linft.runs.store import atomic_write_text


def _val_acc(logits: dict, labels: dict, roles: dict) -> float:
    accs = [metrics(lg, labels[k])["acc"] for k, lg in logits.items() if k[1] == "out" and roles[k[0]] == "train"]
    return sum(accs) / len(accs)


def soups(run_paths: list[str | Path], out_root: str | Path) -> list[dict]:
    """Evaluate the three cross-run baselines on every eval split; returns (and stores) the rows."""
    from linft.analysis.loading import restore_run
    paths = sorted(Path(p) for p in run_paths)
    if len(paths) < 2:
        raise LinftError("a soup needs at least two finished runs")
    soup_id = "soup-" + hashlib.sha256("\n".join(p.name for p in paths).encode()).hexdigest()[:12]
    folder = Path(out_root) / "_soups" / soup_id
    if (folder / "done").exists():
        return [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
    members = [restore_run(p) for p in paths]
    name_of = {id(m): p.name for m, p in zip(members, paths)}
    ref = members[0]
    shape = {n: t.shape for n, t in ref.pipe.trainable.state_dict().items()}
    for m in members[1:]:
        if {n: t.shape for n, t in m.pipe.trainable.state_dict().items()} != shape or \
                m.cfg.test_envs != ref.cfg.test_envs or m.cfg.dataset != ref.cfg.dataset:
            raise LinftError(f"{name_of[id(m)]} does not share {paths[0].name}'s architecture, data and split")
    pre, post, dev = ref.pipe.pre, ref.pipe.post, ref.device
    loaders = ref.data.eval_loaders
    names = [n for n, p in ref.pipe.trainable.named_parameters() if p.requires_grad]

    def evaluate(params=None, module=None):
        module = module or ref.pipe.trainable
        out, labels = {}, {}
        for key, loader in loaders.items():
            out[key], labels[key] = predict(pre, post, module, loader, dev, params)
        return out, labels

    per_member = [evaluate(module=m.pipe.trainable) for m in members]
    labels = per_member[0][1]
    roles = ref.data.roles
    ens = {k: torch.stack([lg[k] for lg, _ in per_member]).mean(0) for k in labels}

    def average(group):
        sd = [dict(m.pipe.trainable.named_parameters()) for m in group]
        return {n: torch.stack([s[n].detach() for s in sd]).mean(0) for n in names}

    uniform = evaluate(average(members))[0]
    order = sorted(range(len(members)), key=lambda i: -_val_acc(per_member[i][0], labels, roles))
    greedy, best = [members[order[0]]], _val_acc(per_member[order[0]][0], labels, roles)
    for i in order[1:]:
        trial = greedy + [members[i]]
        acc = _val_acc(evaluate(average(trial))[0], labels, roles)
        if acc >= best:
            greedy, best = trial, acc
    greedy_logits = evaluate(average(greedy))[0]
    rows = []
    for model, logits, n in (("uniform_soup", uniform, len(members)), ("greedy_soup", greedy_logits, len(greedy)),
                             ("output_ensemble", ens, len(members))):
        for (env, split), lg in logits.items():
            for metric, value in metrics(lg, labels[(env, split)]).items():
                rows.append(dict(run=soup_id, kind="soup", model=model, members=n, env=env, role=roles[env],
                                 split=split, metric=metric, value=value))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.json", json.dumps({"members": [p.name for p in paths],
                                                          "greedy": [name_of[id(m)] for m in greedy]}, indent=1))
    atomic_write_text(folder / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(folder / "done", "")
    return rows
