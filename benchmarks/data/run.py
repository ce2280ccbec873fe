"""Data pruning on real data: test accuracy as 10-70% of the training set is removed.

Datasets: Fashion-MNIST (first 10,000 training images, first 2,000 test images; Debian
``dataset-fashion-mnist``), MNIST-1D generated large (40,000 train, the abundant regime) and
scarce (2,000 train) with the ``mnist1d`` package. Model: an MLP (one hidden layer of 128),
Adam 1e-3, batch 128. Scores, computed once per dataset on the full training set:
EL2N (3 runs of 2 epochs), GraNd (3 runs of 1 epoch), forgetting (1 run of the full
training length), prototypes (k-means, k = 10, on a label-free embedding: the first 32
principal components of the inputs; no self-supervised encoder is available offline),
random (a new draw per seed). Each kept subset trains a fresh model with 3 seeds.

``.venv/bin/python benchmarks/data/run.py`` (~15 min on 2 cores; ``pip install mnist1d scipy``);
writes ``benchmarks/results/data_pruning.{json,md,png}``; resumable (finished cells are kept).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prunekit.data import TrainConfig, accuracy, score, select, train  # noqa: E402
from prunekit.datasets import load_fashion_mnist, load_mnist1d  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("benchmarks.data")
SCORES = ("el2n", "grand", "forgetting", "prototypes")


def datasets(large: int, scarce: int) -> dict[str, tuple[TensorDataset, TensorDataset, int]]:
    """name -> (train, test, epochs)."""
    x, y = load_fashion_mnist("train", limit=10_000)
    tx, ty = load_fashion_mnist("test", limit=2_000)
    out = {"fashion-mnist 10k": (TensorDataset(x.flatten(1), y), TensorDataset(tx.flatten(1), ty), 5)}
    for name, n, epochs in (("mnist1d large", large, 5), ("mnist1d scarce", scarce, 30)):
        x, y = load_mnist1d("train", num_samples=n)
        tx, ty = load_mnist1d("test", num_samples=n)
        out[f"{name} {len(y) // 1000 if len(y) >= 1000 else len(y)}{'k' if len(y) >= 1000 else ''}"] = (
            TensorDataset(x.flatten(1), y), TensorDataset(tx.flatten(1), ty), epochs)
    return out


def mlp(d: int):
    return lambda: nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, 10))


def pca_encoder(x: torch.Tensor, k: int = 32):
    mean = x.mean(0)
    _, _, v = torch.pca_lowrank(x - mean, q=k, center=False)  # v: (D, k)
    return lambda b: (b - mean) @ v


def fit(model_fn, data, test, epochs: int, seed: int, indices=None) -> float:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_fn()
    return accuracy(train(model, data, TrainConfig(epochs=epochs, seed=seed), indices=indices), test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--removed", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    ap.add_argument("--large", type=int, default=50_000, help="MNIST-1D samples, abundant (80% train)")
    ap.add_argument("--scarce", type=int, default=2_500, help="MNIST-1D samples, scarce (80% train)")
    ap.add_argument("--replot", action="store_true", help="rebuild table and plot from the saved JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    path = RESULTS / "data_pruning.json"
    out = json.loads(path.read_text()) if path.is_file() else {"cells": {}, "full": {}, "score_seconds": {}}
    if not args.replot:
        for name, (data, test, epochs) in datasets(args.large, args.scarce).items():
            d = data.tensors[0].shape[1]
            model_fn = mlp(d)
            out["full"].setdefault(name, [fit(model_fn, data, test, epochs, s) for s in range(args.seeds)])
            scores = {}
            for method in SCORES:
                t0 = time.perf_counter()
                runs, ep = {"el2n": (3, 2), "grand": (3, 1), "forgetting": (1, epochs), "prototypes": (1, 1)}[method]
                scores[method] = score(method, data, model=model_fn, train=TrainConfig(epochs=ep), runs=runs,
                                       encoder=pca_encoder(data.tensors[0]), clusters=10, progress=False)
                out["score_seconds"][f"{name}/{method}"] = time.perf_counter() - t0
            for removed in args.removed:
                for method in (*SCORES, "random"):
                    for mode in (("hard", "easy") if method != "random" else ("-",)):
                        key = f"{name}|{method}|{mode}|{removed}"
                        if key in out["cells"]:
                            continue
                        accs = []
                        for seed in range(args.seeds):
                            s = scores.get(method)
                            if s is None:
                                s = torch.rand(len(data), generator=torch.Generator().manual_seed(seed))
                            keep = select(s, remove=removed, mode=mode if mode != "-" else "hard")
                            accs.append(fit(model_fn, data, test, epochs, seed, keep))
                        out["cells"][key] = accs
                        log.info("%s %s", key, accs)
                        RESULTS.mkdir(parents=True, exist_ok=True)
                        path.write_text(json.dumps(out, indent=1))
        out["date"] = time.strftime("%Y-%m-%d")
        out["args"] = {k: v for k, v in vars(args).items() if k != "replot"}
        path.write_text(json.dumps(out, indent=1))
    (RESULTS / "data_pruning.md").write_text(markdown(out))
    plot(out, RESULTS / "data_pruning.png")


def _fmt(accs: list[float]) -> str:
    m = 100 * statistics.mean(accs)
    sd = 100 * statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{m:.1f} ± {sd:.1f}"


def markdown(out: dict) -> str:
    removed = sorted({float(k.split("|")[3]) for k in out["cells"]})
    lines = [f"# Data pruning ({out.get('date', '')})", "",
             "Test accuracy %, mean ± std over seeds; columns: fraction of the training set removed.", ""]
    for name, full in out["full"].items():
        lines += [f"**{name}** (full training set: {_fmt(full)})", "",
                  "| score | keep | " + " | ".join(f"{r:.0%} removed" for r in removed) + " |",
                  "|---|---|" + "---|" * len(removed)]
        for method in (*SCORES, "random"):
            for mode in (("hard", "easy") if method != "random" else ("-",)):
                cells = [out["cells"].get(f"{name}|{method}|{mode}|{r}") for r in removed]
                lines.append(f"| {method} | {mode} | " + " | ".join(_fmt(c) if c else "" for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(out["full"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4))
    for ax, name in zip(axes, names):
        for method in (*SCORES, "random"):
            for mode in (("hard", "easy") if method != "random" else ("-",)):
                pts = sorted((float(k.split("|")[3]), 100 * statistics.mean(v)) for k, v in out["cells"].items()
                             if k.startswith(f"{name}|{method}|{mode}|"))
                if pts:
                    ax.plot(*zip(*pts), marker="o", ls="-" if mode != "easy" else "--",
                            label=f"{method} {mode}" if mode != "-" else method)
        ax.axhline(100 * statistics.mean(out["full"][name]), color="k", ls=":", label="full set")
        ax.set(title=name, xlabel="fraction removed", ylabel="test accuracy %")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
