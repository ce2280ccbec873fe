"""Static sparse training vs SET vs RigL, with uniform vs ERK layer densities, at 90/95/98%
sparsity; LeNet-300-100 on Fashion-MNIST, trained sparse from scratch (no dense phase).

Static: the same random initial mask, fixed. SET (Mocanu et al. 2018): drop smallest
magnitudes, regrow at random. RigL (Evci et al. 2020): drop smallest magnitudes, regrow by
dense-gradient magnitude. Both update every ``--update-every`` steps with fraction 0.3
cosine-decayed to 0 at 75% of training, as in the RigL paper. Published anchor: RigL > SET >
static at equal sparsity, and ERK > uniform (RigL paper, Fig. 2 / Table 1, ResNet-50 on
ImageNet at 80-96.5%).

    .venv/bin/python benchmarks/training/sparse_training.py [--seeds 3] [--epochs 10] [--optimizer adam|sgd] [--replot]
"""
from __future__ import annotations

import common
import torch

from prunekit.schedules import DynamicSparse

NAMES = [f"{m} ({a})" for a in ("uniform", "erk") for m in ("static", "set", "rigl")]


def optimizer(args, model):
    if args.optimizer == "sgd":  # the RigL paper's optimizer
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
    return common.adam(model)


def experiment(args, x, y, xt, yt) -> list[dict]:
    total = common.steps_per_epoch(len(y)) * args.epochs
    rows = []
    for seed in range(args.seeds):
        for target in args.sparsities:
            for alloc in ("uniform", "erk"):
                for method in ("static", "set", "rigl"):
                    model = common.lenet_300_100(seed)
                    opt = optimizer(args, model)
                    sched = DynamicSparse(method, target, update_every=args.update_every, alpha=0.3,
                                          end=int(0.75 * total), allocation=alloc)
                    ctrl = common.SparsityController(model, opt, sched, seed=seed)
                    common.train(model, opt, ctrl, x, y, args.epochs, seed)
                    rows.append({"seed": seed, "target": target, "allocation": alloc, "method": method,
                                 "sparsity": ctrl.sparsity(), "acc": common.accuracy(model, xt, yt)})
            common.log.info("seed %d target %.2f: %s", seed, target,
                            [f"{q['method']}/{q['allocation']} {q['acc']:.4f}" for q in rows[-6:]])
    return rows


def report(rows, args):
    series: dict[str, dict] = {}
    for q in rows:
        series.setdefault(f"{q['method']} ({q['allocation']})", {}).setdefault(q["target"], []).append(q["acc"])
    lines = ["| sparsity | " + " | ".join(NAMES) + " |", "|---" * (len(NAMES) + 1) + "|"]
    for s in args.sparsities:
        lines.append(f"| {s:.0%} | " + " | ".join(common.fmt(series[n][s]) for n in NAMES) + " |")
    opt = "Adam 1.2e-3" if args.optimizer == "adam" else "SGD 0.05, Nesterov momentum 0.9, wd 1e-4"
    table = (f"Sparse training from scratch, LeNet-300-100 on Fashion-MNIST ({args.n_train} train / 2000 test), "
             f"{args.epochs} epochs, {opt}, updates every {args.update_every} steps, alpha 0.3 cosine to 75%. "
             f"Test accuracy %, mean ± std over {args.seeds} seeds.\n\n" + "\n".join(lines))
    return table, {n: series[n] for n in NAMES}


def main() -> None:
    ap = common.parser(epochs=10, sparsities=[0.9, 0.95, 0.98])
    ap.add_argument("--update-every", type=int, default=50)
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    args, _ = ap.parse_known_args()
    name = "sparse_training" + ("_sgd" if args.optimizer == "sgd" else "")
    common.run(name, ap, experiment, report, f"Static vs SET vs RigL, uniform vs ERK ({args.optimizer})")


if __name__ == "__main__":
    main()
