"""Lottery tickets (Frankle & Carbin 2019) on Fashion-MNIST with LeNet-300-100.

Iterative magnitude pruning, 30% of the survivors per round (layerwise), survivors rewound
to initialisation; each round's mask is also trained from a fresh random initialisation
(the paper's "random reinit" control) and as a layerwise-shuffled random mask on the
original initialisation ("random mask"). Published anchor: on MNIST, LeNet-300-100 tickets
keep (even beat) dense accuracy down to ~3.6% of weights remaining, while re-initialised
tickets fall off from ~50% remaining (Frankle & Carbin 2019, Fig. 4).

    .venv/bin/python benchmarks/training/lottery.py [--seeds 3] [--rounds 11] [--epochs 8] [--replot]
"""
from __future__ import annotations

import common
import torch

from prunekit.schedules import Iterative, LotteryTicket, reinitialize, shuffle_masks

KINDS = ["ticket", "random reinit", "random mask"]


def train_masked(model, masks, x, y, epochs, seed):
    opt = common.adam(model)
    ctrl = common.SparsityController(model, opt, masks=masks)
    common.train(model, opt, ctrl, x, y, epochs, seed)
    ctrl.make_permanent()


def experiment(args, x, y, xt, yt) -> list[dict]:
    cfg = Iterative(rounds=args.rounds, rate=args.rate, rewind_step=0, allocation="uniform")
    rows = []
    for seed in range(args.seeds):
        model = common.lenet_300_100(seed)
        ticket = LotteryTicket(model, cfg)
        for r in range(cfg.rounds + 1):
            train_masked(model, ticket.masks, x, y, args.epochs, seed)
            sparsity = common.weight_sparsity(ticket.masks)
            rows.append({"seed": seed, "round": r, "sparsity": sparsity, "kind": "ticket",
                         "acc": common.accuracy(model, xt, yt)})
            if r > 0:  # controls on the same round's mask
                reinit = common.lenet_300_100(seed)
                reinitialize(reinit, seed=10_000 + seed)
                train_masked(reinit, ticket.masks, x, y, args.epochs, seed)
                rows.append({"seed": seed, "round": r, "sparsity": sparsity, "kind": "random reinit",
                             "acc": common.accuracy(reinit, xt, yt)})
                rand = common.lenet_300_100(seed)  # the original initialisation
                shuffled = shuffle_masks(ticket.masks, torch.Generator().manual_seed(seed))
                train_masked(rand, shuffled, x, y, args.epochs, seed)
                rows.append({"seed": seed, "round": r, "sparsity": sparsity, "kind": "random mask",
                             "acc": common.accuracy(rand, xt, yt)})
            common.log.info("seed %d round %d sparsity %.3f: %s", seed, r, sparsity,
                            [f"{q['kind']} {q['acc']:.4f}" for q in rows if q["seed"] == seed and q["round"] == r])
            if r < cfg.rounds:
                ticket.prune_and_rewind()
    return rows


def report(rows, args):
    series = {k: {} for k in KINDS}
    for q in rows:
        series[q["kind"]].setdefault(round(q["sparsity"], 4), []).append(q["acc"])
    lines = ["| weights remaining | rewound ticket | random reinit | random mask |", "|---|---|---|---|"]
    for s in sorted(series["ticket"]):
        cells = [common.fmt(series[k][s]) if s in series[k] else "—" for k in KINDS]
        lines.append(f"| {100 * (1 - s):.1f}% | " + " | ".join(cells) + " |")
    table = (f"Lottery tickets, LeNet-300-100 on Fashion-MNIST ({args.n_train} train / 2000 test images), "
             f"IMP {args.rate:.0%}/round layerwise, rewind to init, {args.epochs} epochs per round, Adam 1.2e-3; "
             f"test accuracy %, mean ± std over {args.seeds} seeds.\n\n" + "\n".join(lines))
    return table, series


def main() -> None:
    ap = common.parser(epochs=8)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--rate", type=float, default=0.3)
    common.run("lottery", ap, experiment, report, "Lottery tickets: LeNet-300-100, Fashion-MNIST")


if __name__ == "__main__":
    main()
