"""Pruning at initialisation: SNIP, GraSP, SynFlow, magnitude (global threshold, and global
with a per-layer minimum) and random (uniform / ERK), each with and without layerwise
shuffling of its mask, at 90/95/98% sparsity; LeNet-300-100 on Fashion-MNIST, the mask fixed
through training.

Published anchors: SNIP (Lee et al. 2019) keeps LeNet-300-100 near dense accuracy on MNIST
at 95-98%; SynFlow (Tanaka et al. 2020) matches or beats SNIP/GraSP at high sparsity and
avoids layer collapse; Frankle et al. 2021 ("Missing the Mark") find that shuffling each
layer's mask does not hurt SNIP/GraSP/SynFlow, i.e. they choose layer ratios, not weights.

    .venv/bin/python benchmarks/training/at_init.py [--seeds 3] [--epochs 8] [--replot]
"""
from __future__ import annotations

import common
import torch

from prunekit.schedules import AtInit, prune_at_init

METHODS = [("snip", None), ("grasp", None), ("synflow", None), ("magnitude", None), ("magnitude", "global_min"),
           ("random", "uniform"), ("random", "erk")]


def label(method: str, alloc: str | None) -> str:
    return method + (f" ({alloc})" if alloc else "")


def experiment(args, x, y, xt, yt) -> list[dict]:
    rows = []
    for seed in range(args.seeds):
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[: args.score_batch]
        batches = [(x[idx], y[idx])]
        for target in args.sparsities:
            for method, alloc in METHODS:
                for shuffle in ((False,) if method == "random" else (False, True)):
                    model = common.lenet_300_100(seed)
                    masks = prune_at_init(model, AtInit(method, target, allocation=alloc, shuffle=shuffle, seed=seed),
                                          batches)
                    opt = common.adam(model)
                    ctrl = common.SparsityController(model, opt, masks=masks)
                    common.train(model, opt, ctrl, x, y, args.epochs, seed)
                    rows.append({"seed": seed, "target": target, "method": label(method, alloc), "shuffled": shuffle,
                                 "sparsity": ctrl.sparsity(), "acc": common.accuracy(model, xt, yt),
                                 "layer_sparsity": {n: round(float(m.float().mean()), 4) for n, m in masks.items()}})
            common.log.info("seed %d target %.2f: %s", seed, target,
                            [f"{q['method']}{'/shuf' if q['shuffled'] else ''} {q['acc']:.4f}"
                             for q in rows if q["seed"] == seed and q["target"] == target])
    return rows


def report(rows, args):
    series: dict[str, dict] = {}
    for q in rows:
        key = q["method"] + (", shuffled" if q["shuffled"] else "")
        series.setdefault(key, {}).setdefault(q["target"], []).append(q["acc"])
    lines = ["| method | " + " | ".join(f"{s:.0%}" for s in args.sparsities) + " | "
             + " | ".join(f"{s:.0%} shuffled" for s in args.sparsities) + " |",
             "|---" * (2 * len(args.sparsities) + 1) + "|"]
    for method, alloc in METHODS:
        name = label(method, alloc)
        cells = [common.fmt(series[name][s]) for s in args.sparsities]
        shuf = [common.fmt(series[f"{name}, shuffled"][s]) if f"{name}, shuffled" in series else "—"
                for s in args.sparsities]
        lines.append(f"| {name} | " + " | ".join(cells + shuf) + " |")
    table = (f"Pruning at initialisation, LeNet-300-100 on Fashion-MNIST ({args.n_train} train / 2000 test), "
             f"masks from one batch of {args.score_batch} (SynFlow: data-free, 100 iterations), then {args.epochs} "
             f"epochs of Adam 1.2e-3 with the mask fixed. Test accuracy %, mean ± std over {args.seeds} seeds.\n\n"
             + "\n".join(lines))
    return table, series


def main() -> None:
    ap = common.parser(epochs=8, sparsities=[0.9, 0.95, 0.98])
    ap.add_argument("--score-batch", type=int, default=256)
    common.run("at_init", ap, experiment, report, "Pruning at initialisation (with/without layer shuffle)")


if __name__ == "__main__":
    main()
