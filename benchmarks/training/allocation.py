"""Global vs layerwise vs global-with-minimum magnitude pruning, one-shot on a trained
LeNet-300-100 (Fashion-MNIST), at 90-99.5% sparsity, before and after a short fine-tune.

- layerwise (``uniform``): every layer loses the same fraction;
- global: one magnitude threshold over all layers (Frankle & Carbin's choice for deep nets);
- global with minimum (``global_min``): one threshold, but every layer keeps at least 25% of
  the average density, against layer collapse (Tanaka et al. 2020).
Published anchor: global magnitude pruning beats layerwise at high sparsity because layers
differ in redundancy (Blalock et al. 2020, "What is the state of neural network pruning?",
Fig. 5; Frankle & Carbin 2019, Sec. 4), while at extreme sparsity global pruning can empty
a layer and collapse accuracy to chance (Tanaka et al. 2020, Fig. 1).

    .venv/bin/python benchmarks/training/allocation.py [--seeds 3] [--replot]
"""
from __future__ import annotations

import copy

import common

from prunekit.schedules import Gradual

ALLOCS = ["uniform", "global", "global_min"]


def experiment(args, x, y, xt, yt) -> list[dict]:
    rows = []
    for seed in range(args.seeds):
        dense = common.lenet_300_100(seed)
        common.train(dense, common.adam(dense), None, x, y, args.epochs, seed)
        dense_acc = common.accuracy(dense, xt, yt)
        for target in args.sparsities:
            for alloc in ALLOCS:
                model = copy.deepcopy(dense)
                opt = common.adam(model)
                ctrl = common.SparsityController(model, opt, Gradual(target=target, start=0, end=0, allocation=alloc))
                pruned_acc = common.accuracy(model, xt, yt)
                common.train(model, opt, ctrl, x, y, args.finetune, seed + 1000)
                layer = {n: round(float(m.float().mean()), 4) for n, m in ctrl.masks.items()}
                rows.append({"seed": seed, "target": target, "allocation": alloc, "dense_acc": dense_acc,
                             "acc_pruned": pruned_acc, "acc": common.accuracy(model, xt, yt),
                             "sparsity": ctrl.sparsity(), "layer_sparsity": layer})
            common.log.info("seed %d target %.3f: %s", seed, target,
                            [f"{q['allocation']} {q['acc_pruned']:.3f}->{q['acc']:.3f}" for q in rows[-3:]])
    return rows


def report(rows, args):
    series_ft: dict[str, dict] = {}
    series_0: dict[str, dict] = {}
    for q in rows:
        series_ft.setdefault(f"{q['allocation']}, fine-tuned", {}).setdefault(q["target"], []).append(q["acc"])
        series_0.setdefault(f"{q['allocation']}, no fine-tune", {}).setdefault(q["target"], []).append(q["acc_pruned"])
    dense_accs = [a for _, a in sorted({(q["seed"], q["dense_acc"]) for q in rows})]
    lines = ["| sparsity | " + " | ".join(f"{a}: pruned → fine-tuned" for a in ALLOCS)
             + " | last-layer sparsity (uniform / global / global_min) |", "|---" * (len(ALLOCS) + 2) + "|"]
    for s in args.sparsities:
        cells = [f"{common.fmt(series_0[f'{a}, no fine-tune'][s])} → {common.fmt(series_ft[f'{a}, fine-tuned'][s])}"
                 for a in ALLOCS]
        last = [sum(q["layer_sparsity"]["4.weight"] for q in rows if q["target"] == s and q["allocation"] == a)
                / args.seeds for a in ALLOCS]
        lines.append(f"| {s:.1%} | " + " | ".join(cells) + " | " + " / ".join(f"{v:.3f}" for v in last) + " |")
    table = (f"One-shot magnitude pruning of a trained LeNet-300-100 (Fashion-MNIST, {args.n_train} train / 2000 "
             f"test, {args.epochs} dense epochs; dense accuracy {common.fmt(dense_accs)}), then {args.finetune} epochs "
             f"of masked fine-tuning. Test accuracy %, mean ± std over {args.seeds} seeds.\n\n" + "\n".join(lines))
    return table, series_0 | series_ft


def main() -> None:
    ap = common.parser(epochs=8, sparsities=[0.9, 0.95, 0.98, 0.99, 0.995])
    ap.add_argument("--finetune", type=int, default=2, help="fine-tuning epochs after pruning")
    common.run("allocation", ap, experiment, report, "Layerwise vs global vs global-with-minimum")


if __name__ == "__main__":
    main()
