"""Data pruning on real data: test accuracy as 10-70% of the training set is removed.

Datasets (every one offline):
- Fashion-MNIST: the first 20,000 training images, the full 10,000-image test set (Debian
  ``dataset-fashion-mnist``); an MLP 784-256-10, 5 epochs.
- MNIST-1D (Greydanus 2020) generated large (50,000 sequences: 40,000 train, the abundant
  regime) and scarce (2,500: 2,000 train, tested on the large set's 10,000 test sequences);
  a small 1D CNN, 5 epochs (large) or 30 (scarce).
Training: Adam 1e-3, batch 128, the same number of epochs on every pruned set (so fewer
steps on smaller sets, as Paul et al. and Sorscher et al. train); 3 seeds per cell.

Scores, computed once per dataset on its full training set (seed 0): EL2N (3 runs, at 40%
of the training length), GraNd (3 runs, at 20%), forgetting events (3 runs of twice the
training length), prototypes (k-means, k = 10, cosine, on a label-free embedding: the top 32
principal components of the inputs, 20 for MNIST-1D; no self-supervised encoder is available
offline), random (a new draw per seed). Keep-hard and keep-easy for every score but random.
On Fashion-MNIST also knowledge distillation from a teacher trained on the full set
(Ben-Baruch et al. 2024; alpha 0.5, T = 4) for random, EL2N keep-hard and keep-easy.

``.venv/bin/python benchmarks/data/run.py`` (about 15 min on 2 shared cores; needs
``pip install mnist1d scipy -c .venv/constraints.txt``); writes
``benchmarks/results/data_pruning.{json,md,png}``, cell by cell: a rerun skips finished
cells (scores are cached under ``~/.cache/prunekit/bench-data``); ``--replot`` only rebuilds
the Markdown and the plot.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prunekit.data import Distillation, TrainConfig, accuracy, score, select, train  # noqa: E402
from prunekit.datasets import load_fashion_mnist, load_mnist1d  # noqa: E402
from report import markdown, plot  # noqa: E402

RESULTS = Path(os.environ.get("PRUNEKIT_BENCH_RESULTS", ROOT / "benchmarks" / "results"))
CACHE = Path(os.environ.get("PRUNEKIT_BENCH_CACHE", Path.home() / ".cache" / "prunekit" / "bench-data"))
log = logging.getLogger("benchmarks.data")
SCORES = ("el2n", "grand", "forgetting", "prototypes")
#: each score's short runs, as (runs, fraction of the training length)
SCORE_RUNS = {"el2n": (3, 0.4), "grand": (3, 0.2), "forgetting": (3, 2.0), "prototypes": (1, 0.0)}
KD_METHODS = (("random", "-"), ("el2n", "hard"), ("el2n", "easy"))
VERSION = 2  # cells of other versions (an earlier recipe) are recomputed


@dataclass(frozen=True)
class Bench:
    """One dataset of the benchmark: data, model factory, training length, embedding size."""

    name: str
    train: TensorDataset
    test: TensorDataset
    model: Callable[[], nn.Module]
    epochs: int
    pca: int
    distill: bool = False


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 5, stride=2, padding=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 20, 10))


def benches(fashion: int, large: int, scarce: int) -> list[Bench]:
    x, y = load_fashion_mnist("train", limit=fashion)
    tx, ty = load_fashion_mnist("test")
    out = [Bench(f"fashion-mnist {len(y) / 1000:g}k", TensorDataset(x, y), TensorDataset(tx, ty), mlp, 5, 32, True)]
    x, y = load_mnist1d("train", num_samples=large)
    tx, ty = load_mnist1d("test", num_samples=large)
    test = TensorDataset(tx, ty)
    out.append(Bench(f"mnist1d large {len(y) / 1000:g}k", TensorDataset(x, y), test, cnn1d, 5, 20))
    x, y = load_mnist1d("train", num_samples=scarce, seed=7)  # another draw of the same distribution
    out.append(Bench(f"mnist1d scarce {len(y) / 1000:g}k", TensorDataset(x, y), test, cnn1d, 30, 20))
    return out


def pca_encoder(x: torch.Tensor, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Projection onto the top ``k`` principal components of the inputs (label-free)."""
    flat = x.flatten(1)
    mean = flat.mean(0)
    _, _, v = torch.pca_lowrank(flat - mean, q=k, center=False, niter=4)  # v: (D, k)
    return lambda b: (b.flatten(1) - mean) @ v


def fresh(bench: Bench, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return bench.model()


def fit(bench: Bench, seed: int, indices=None, distill: Distillation | None = None) -> float:
    model = train(fresh(bench, seed), bench.train, TrainConfig(epochs=bench.epochs, seed=seed), indices=indices,
                  distill=distill)
    return accuracy(model, bench.test)


def scores_of(bench: Bench, out: dict) -> dict[str, torch.Tensor]:
    """Every score of ``bench``'s training set, cached on disk."""
    got = {}
    for method in SCORES:
        path = CACHE / f"v{VERSION}-{bench.name.replace(' ', '_')}-{method}.pt"
        if path.is_file():
            got[method] = torch.load(path)
            continue
        runs, share = SCORE_RUNS[method]
        cfg = TrainConfig(epochs=max(1, round(share * bench.epochs)), seed=0)
        t0 = time.perf_counter()
        got[method] = score(method, bench.train, model=bench.model, train=cfg, runs=runs,
                            encoder=pca_encoder(bench.train.tensors[0], bench.pca), clusters=10, progress=False)
        out["score_seconds"][f"{bench.name}|{method}"] = round(time.perf_counter() - t0, 1)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(got[method], path)
        log.info("%s: %s scores in %.0f s", bench.name, method, out["score_seconds"][f"{bench.name}|{method}"])
    return got


def cells(bench: Bench, removed: list[float]):
    """Every (key, method, mode, fraction, distilled) cell of one dataset."""
    for r in removed:
        for method in (*SCORES, "random"):
            for mode in (("hard", "easy") if method != "random" else ("-",)):
                yield f"{bench.name}|{method}|{mode}|{r}", method, mode, r, False
        if bench.distill:
            for method, mode in KD_METHODS:
                yield f"{bench.name}|{method}+kd|{mode}|{r}", method, mode, r, True


def save(out: dict, path: Path) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)  # a reader never sees half a file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--removed", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    ap.add_argument("--fashion", type=int, default=20_000, help="Fashion-MNIST training images")
    ap.add_argument("--large", type=int, default=50_000, help="MNIST-1D samples, abundant (80%% train)")
    ap.add_argument("--scarce", type=int, default=2_500, help="MNIST-1D samples, scarce (80%% train)")
    ap.add_argument("--replot", action="store_true", help="rebuild the Markdown and the plot from the saved JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)  # the machine is shared; small matrices run faster on one thread than on two fighting
    path = RESULTS / "data_pruning.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    if out.get("version") != VERSION:
        out = {"version": VERSION, "cells": {}, "full": {}, "score_seconds": {}, "seconds": 0.0}
    if not args.replot:
        started = time.perf_counter()
        for bench in benches(args.fashion, args.large, args.scarce):
            if bench.name not in out["full"]:
                out["full"][bench.name] = [fit(bench, s) for s in range(args.seeds)]
                log.info("%s full set: %s", bench.name, out["full"][bench.name])
            todo = [c for c in cells(bench, args.removed) if c[0] not in out["cells"]]
            if not todo:
                continue
            scores = scores_of(bench, out)
            teacher = train(fresh(bench, 0), bench.train, TrainConfig(epochs=bench.epochs)) if bench.distill else None
            for key, method, mode, removed, distilled in todo:
                accs = []
                for seed in range(args.seeds):
                    s = scores.get(method)
                    if s is None:  # random: a new draw per seed
                        s = torch.rand(len(bench.train), generator=torch.Generator().manual_seed(1000 + seed))
                    keep = select(s, remove=removed, mode="hard" if mode == "-" else mode, seed=seed)
                    kd = Distillation(teacher, alpha=0.5, temperature=4.0) if distilled else None
                    accs.append(fit(bench, seed, keep, kd))
                out["cells"][key] = accs
                out["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                log.info("%s %s", key, [round(a, 4) for a in accs])
                save(out, path)
        out["seconds"] += time.perf_counter() - started
        out.update(date=time.strftime("%Y-%m-%d"), args={k: v for k, v in vars(args).items() if k != "replot"},
                   environment={"torch": torch.__version__, "python": platform.python_version(), "threads": 1,
                                "machine": platform.machine()})
        save(out, path)
    (RESULTS / "data_pruning.md").write_text(markdown(out))
    plot(out, RESULTS / "data_pruning.png")
    log.info("wrote %s.{json,md,png}; %.0f s of compute in all", path.with_suffix(""), math.fsum([out["seconds"]]))


if __name__ == "__main__":
    main()
