"""``soup``: baselines across finished runs ([ZB] Sec. 4; DiWA, model soups): uniform weight soup,
greedy soup ordered by training-domain validation accuracy, and the output ensemble of the members.

Weight soups average the *trainable* parameters of runs that share an architecture, a split and
everything they do not train: the frozen trunk, BatchNorm statistics and, for linearized runs,
theta0 (checked; a member that differs is refused by name, since every member is evaluated on the
first member's frozen parts). The output ensemble (``model="output_ensemble"``,
``combine="mean_logits"``) *averages* the members' logits; [ZB]'s ensembles sum them: the same
argmax and accuracy, a different loss (the mean is the calibrated one). The runs' own trajectory
ensembles (``model="traj_ens"`` eval rows) average logits the same way. Rows per (env, split);
``members`` = how many runs the model combines (greedy: the ones it kept; the folder's config.json
lists them). The members are a set: the folder lives under the member whose id sorts first.
"""
from __future__ import annotations

import torch

from linft.analysis.loading import LoadedRun, first_difference, frozen_state
from linft.analysis.spec import Analysis
from linft.errors import LinftError
from linft.training.evaluate import metrics, predict


def _val_acc(logits: dict, labels: dict, roles: dict) -> float:
    accs = [metrics(lg, labels[k])["acc"] for k, lg in logits.items() if k[1] == "out" and roles[k[0]] == "train"]
    return sum(accs) / len(accs)


def check_members(members: list[LoadedRun]) -> None:
    """Refuse members that cannot share one evaluation: another architecture, data or split, or other
    frozen weights, BatchNorm statistics or (linearized runs) theta0 than the first member."""
    ref = members[0]
    shape = {n: t.shape for n, t in ref.trainable.state_dict().items()}
    frozen = frozen_state(ref)
    for m in members[1:]:
        if {n: t.shape for n, t in m.trainable.state_dict().items()} != shape or \
                m.cfg.test_envs != ref.cfg.test_envs or m.cfg.dataset != ref.cfg.dataset:
            raise LinftError(f"{m.id} does not share {ref.id}'s architecture, data and split")
        diff = first_difference(frozen, frozen_state(m))
        if diff is None and (ref.linear or m.linear):
            diff = first_difference(ref.theta0, m.theta0)
        if diff is not None:
            raise LinftError(f"{m.id} does not share {ref.id}'s frozen trunk ({diff} differs, e.g. another seed "
                             "of a randomly initialised backbone): a soup or an output ensemble evaluates every "
                             "member on one frozen trunk")


def soup(members: list[LoadedRun]) -> tuple[list[dict], dict]:
    check_members(members)
    ref = members[0]
    pre, post, dev = ref.trainer.pipe.pre, ref.trainer.pipe.post, ref.device
    loaders = ref.trainer.data.eval_loaders
    names = list(ref.theta)

    def evaluate(params=None, module=None):
        module = module or ref.trainable
        out, labels = {}, {}
        for key, loader in loaders.items():
            out[key], labels[key] = predict(pre, post, module, loader, dev, params)
        return out, labels

    per_member = [evaluate(module=m.trainable) for m in members]
    labels = per_member[0][1]
    roles = ref.roles()
    ens = {k: torch.stack([lg[k] for lg, _ in per_member]).mean(0) for k in labels}

    def average(group):
        return {n: torch.stack([m.theta[n] for m in group]).mean(0) for n in names}

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
    for model, logits, n, combine in (("uniform_soup", uniform, len(members), "mean_weights"),
                                      ("greedy_soup", greedy_logits, len(greedy), "mean_weights"),
                                      ("output_ensemble", ens, len(members), "mean_logits")):
        for (env, split), lg in logits.items():
            for metric, value in metrics(lg, labels[(env, split)]).items():
                rows.append(dict(model=model, members=n, combine=combine, env=env, role=roles[env], split=split,
                                 metric=metric, value=value))
    return rows, {"members": [m.id for m in members], "greedy": [m.id for m in greedy],
                  "output_ensemble": "mean of the members' logits ([ZB] sums them: same accuracy, another loss)"}


def _headline(row: dict) -> bool:
    return (row.get("role"), row.get("split")) in (("test", "in"), ("train", "out"))


ANALYSIS = Analysis(
    "soup", soup, runs=(2, None), ordered=False,
    help="uniform soup, greedy soup and output ensemble (mean of logits) of runs sharing a frozen trunk",
    summary=("acc",), label=("model",), headline=_headline,
    doc="soup: uniform and greedy weight soups, and the output ensemble, which averages the members' logits "
        "(as the trajectory ensemble traj_ens does; [ZB] sums them: same accuracy, a different loss); "
        "accuracy averaged over domains.")
