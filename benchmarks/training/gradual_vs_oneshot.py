"""Gradual magnitude pruning (Zhu & Gupta 2017) vs one-shot magnitude pruning + fine-tuning,
at 90/95/98% sparsity, same total number of training steps, LeNet-300-100 on Fashion-MNIST.

- gradual: train from scratch; cubic schedule from epoch 1 to 60% of training, pruning every
  quarter epoch, then train on at the target.
- one-shot + fine-tune: train dense for half the steps, prune once to the target by magnitude,
  fine-tune with the mask for the other half.
Both use uniform (layerwise) allocation. Published anchor: Zhu & Gupta report gradual pruning
losing little accuracy up to ~90% and degrading gracefully to 95-98% on Inception/PTB models,
and (with Han et al. 2015) one-shot pruning without enough retraining falling behind at high
sparsity.

    .venv/bin/python benchmarks/training/gradual_vs_oneshot.py [--seeds 3] [--epochs 10] [--replot]
"""
from __future__ import annotations

import common

from prunekit.schedules import Gradual

METHODS = ["gradual", "one-shot + fine-tune"]


def experiment(args, x, y, xt, yt) -> list[dict]:
    spe = common.steps_per_epoch(len(y))
    total = spe * args.epochs
    rows = []
    for seed in range(args.seeds):
        dense = common.lenet_300_100(seed)
        common.train(dense, common.adam(dense), None, x, y, args.epochs, seed)
        rows.append({"seed": seed, "method": "dense", "target": 0.0, "sparsity": 0.0,
                     "acc": common.accuracy(dense, xt, yt)})
        for target in args.sparsities:
            model = common.lenet_300_100(seed)
            opt = common.adam(model)
            end = int(0.6 * total)
            sched = Gradual(target=target, start=min(spe, end), end=end, frequency=max(1, spe // 4))
            ctrl = common.SparsityController(model, opt, sched)
            common.train(model, opt, ctrl, x, y, args.epochs, seed)
            rows.append({"seed": seed, "method": "gradual", "target": target, "sparsity": ctrl.sparsity(),
                         "acc": common.accuracy(model, xt, yt)})

            model = common.lenet_300_100(seed)
            opt = common.adam(model)
            half = args.epochs // 2
            common.train(model, opt, None, x, y, half, seed)
            ctrl = common.SparsityController(model, opt, Gradual(target=target, start=0, end=0))
            after_prune = common.accuracy(model, xt, yt)
            common.train(model, opt, ctrl, x, y, args.epochs - half, seed + 1000)
            rows.append({"seed": seed, "method": "one-shot + fine-tune", "target": target,
                         "sparsity": ctrl.sparsity(), "acc": common.accuracy(model, xt, yt),
                         "acc_before_finetune": after_prune})
            common.log.info("seed %d target %.2f: %s", seed, target,
                            [f"{q['method']} {q['acc']:.4f}" for q in rows[-2:]])
    return rows


def report(rows, args):
    series = {m: {} for m in METHODS}
    for q in rows:
        if q["method"] in series:
            series[q["method"]].setdefault(q["target"], []).append(q["acc"])
    dense_accs = [q["acc"] for q in rows if q["method"] == "dense"]
    lines = ["| sparsity | gradual (Zhu & Gupta) | one-shot + fine-tune | one-shot, before fine-tune |",
             "|---|---|---|---|"]
    for s in args.sparsities:
        before = [q["acc_before_finetune"] for q in rows if q["method"] == METHODS[1] and q["target"] == s]
        lines.append(f"| {s:.0%} | {common.fmt(series[METHODS[0]][s])} | {common.fmt(series[METHODS[1]][s])} | "
                     f"{common.fmt(before)} |")
    table = (f"Gradual vs one-shot + fine-tune, LeNet-300-100 on Fashion-MNIST ({args.n_train} train / 2000 test), "
             f"{args.epochs} epochs in total for each, Adam 1.2e-3, uniform allocation; dense: "
             f"{common.fmt(dense_accs)}. Test accuracy %, mean ± std over {args.seeds} seeds.\n\n" + "\n".join(lines))
    series["dense"] = {s: dense_accs for s in args.sparsities}
    return table, series


def main() -> None:
    ap = common.parser(epochs=10, sparsities=[0.9, 0.95, 0.98])
    common.run("gradual_vs_oneshot", ap, experiment, report, "Gradual vs one-shot + fine-tune, LeNet-300-100")


if __name__ == "__main__":
    main()
