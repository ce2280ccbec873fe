"""Data pruning on real data: test accuracy as 10-70% of the training set is removed.

Datasets (every one offline):
- Fashion-MNIST: the first 20,000 training images, the full 10,000-image test set (Debian
  ``dataset-fashion-mnist``); an MLP 784-256-10, 5 epochs.
- MNIST-1D (Greydanus 2020) generated large (50,000 sequences: 40,000 train, the abundant
  regime) and scarce (2,500: 2,000 train, tested on the large set's 10,000 test sequences);
  a small 1D CNN, 5 epochs (large) or 60 (scarce; 30 in the equal-epochs run).
Training: Adam 1e-3, batch 128, 3 seeds per cell, under one of two protocols:
``--protocol steps`` (the headline): every pruned set gets the optimizer steps of the full
set (its epochs scaled by 1 / kept fraction), so a cell measures what the kept data
teaches, not how many updates it allows; ``--protocol epochs``: the same number of epochs
on every pruned set (fewer steps on smaller sets), plus knowledge-distillation rows.

Scores, computed once per dataset on its full training set (seed 0): EL2N (3 runs, at 40%
of the training length), GraNd (3 runs, at 20%), forgetting events (3 runs of twice the
training length), prototypes (k-means, k = 10, cosine, on a label-free embedding: the top 32
principal components of the inputs, 20 for MNIST-1D; no self-supervised encoder is available
offline), random (a new draw per seed). Keep-hard and keep-easy for every score but random.
Distillation rows (equal-epochs protocol, Fashion-MNIST): a teacher trained on the full set
(Ben-Baruch et al. 2024; alpha 0.5, T = 4) for random, EL2N keep-hard and keep-easy.

``.venv/bin/python benchmarks/data/run.py --protocol steps`` and ``--protocol epochs``
(about 15 min each on one thread; ``--only NAME`` runs one dataset, so two processes can
share the file; needs ``pip install mnist1d scipy -c .venv/constraints.txt``); writes
``benchmarks/results/data_pruning.{json,md,png}``, cell by cell: a rerun skips finished
cells (scores are cached under ``~/.cache/prunekit/bench-data``); ``--replot`` only rebuilds
the Markdown and the plot.
"""
from __future__ import annotations

import argparse
import fcntl
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
VERSION = 3  # results of other versions (an earlier recipe) are recomputed
PROTOCOLS = ("steps", "epochs")


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
    steps: bool = False  # equal optimizer steps on every pruned set


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 5, stride=2, padding=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 20, 10))


def benches(fashion: int, large: int, scarce: int, scarce_epochs: int) -> list[Bench]:
    x, y = load_fashion_mnist("train", limit=fashion)
    tx, ty = load_fashion_mnist("test")
    out = [Bench(f"fashion-mnist {len(y) / 1000:g}k", TensorDataset(x, y), TensorDataset(tx, ty), mlp, 5, 32, True)]
    x, y = load_mnist1d("train", num_samples=large)
    tx, ty = load_mnist1d("test", num_samples=large)
    test = TensorDataset(tx, ty)
    out.append(Bench(f"mnist1d large {len(y) / 1000:g}k", TensorDataset(x, y), test, cnn1d, 5, 20))
    x, y = load_mnist1d("train", num_samples=scarce, seed=7)  # another draw of the same distribution
    out.append(Bench(f"mnist1d scarce {len(y) / 1000:g}k", TensorDataset(x, y), test, cnn1d, scarce_epochs, 20))
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
    epochs = bench.epochs
    if bench.steps and indices is not None:  # the full set's steps (batches) over the kept examples
        full_steps = bench.epochs * math.ceil(len(bench.train) / 128)
        epochs = max(1, round(full_steps / math.ceil(len(indices) / 128)))
    model = train(fresh(bench, seed), bench.train, TrainConfig(epochs=epochs, seed=seed), indices=indices,
                  distill=distill)
    return accuracy(model, bench.test)


def scores_of(bench: Bench, out: dict) -> dict[str, torch.Tensor]:
    """Every score of ``bench``'s training set, cached on disk."""
    got = {}
    for method in SCORES:
        path = CACHE / f"{bench.name.replace(' ', '_')}-{bench.epochs}ep-{method}.pt"
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
        if bench.distill and not bench.steps:
            for method, mode in KD_METHODS:
                yield f"{bench.name}|{method}+kd|{mode}|{r}", method, mode, r, True


def save(run: dict, path: Path, protocol: str) -> None:
    """Merge this process's results into the file, under a lock (two processes may share it)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = load(path)
        mine = out["protocols"].setdefault(protocol, empty())
        for key in ("cells", "full", "score_seconds"):
            mine[key].update(run[key])
        for key in ("date", "args", "environment"):
            if key in run:
                mine[key] = run[key]
        mine["seconds"] = mine.get("seconds", 0.0) + run.pop("new_seconds", 0.0)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(path)  # a reader never sees half a file


def empty() -> dict:
    return {"cells": {}, "full": {}, "score_seconds": {}, "seconds": 0.0}


def load(path: Path) -> dict:
    out = json.loads(path.read_text()) if path.is_file() else {}
    if out.get("version") == 2:  # the equal-epochs run, before protocols had names
        out = {"version": VERSION, "protocols": {"epochs": {k: v for k, v in out.items() if k != "version"}}}
    return out if out.get("version") == VERSION else {"version": VERSION, "protocols": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", choices=PROTOCOLS, default="steps")
    ap.add_argument("--only", help="run only the datasets whose name starts with this")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--removed", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    ap.add_argument("--fashion", type=int, default=20_000, help="Fashion-MNIST training images")
    ap.add_argument("--large", type=int, default=50_000, help="MNIST-1D samples, abundant (80%% train)")
    ap.add_argument("--scarce", type=int, default=2_500, help="MNIST-1D samples, scarce (80%% train)")
    ap.add_argument("--scarce-epochs", type=int, default=None, help="60 (steps), 30 (epochs)")
    ap.add_argument("--replot", action="store_true", help="rebuild the Markdown and the plot from the saved JSON")
    args = ap.parse_args()
    if args.scarce_epochs is None:
        args.scarce_epochs = 60 if args.protocol == "steps" else 30
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)  # the machine is shared; small matrices run faster on one thread than on two fighting
    path = RESULTS / "data_pruning.json"
    if not args.replot:
        run = {**empty(), **{k: v for k, v in load(path)["protocols"].get(args.protocol, {}).items()}}
        started = time.perf_counter()
        for bench in benches(args.fashion, args.large, args.scarce, args.scarce_epochs):
            if args.only and not bench.name.startswith(args.only):
                continue
            bench = Bench(**{**bench.__dict__, "steps": args.protocol == "steps"})
            if bench.name not in run["full"]:
                run["full"][bench.name] = [fit(bench, s) for s in range(args.seeds)]
                log.info("%s full set: %s", bench.name, run["full"][bench.name])
            todo = [c for c in cells(bench, args.removed) if c[0] not in run["cells"]]
            if not todo:
                continue
            scores = scores_of(bench, run)
            teacher = None
            if any(c[4] for c in todo):
                teacher = train(fresh(bench, 0), bench.train, TrainConfig(epochs=bench.epochs))
            for key, method, mode, removed, distilled in todo:
                accs = []
                for seed in range(args.seeds):
                    s = scores.get(method)
                    if s is None:  # random: a new draw per seed
                        s = torch.rand(len(bench.train), generator=torch.Generator().manual_seed(1000 + seed))
                    keep = select(s, remove=removed, mode="hard" if mode == "-" else mode, seed=seed)
                    kd = Distillation(teacher, alpha=0.5, temperature=4.0) if distilled else None
                    accs.append(fit(bench, seed, keep, kd))
                run["cells"][key] = accs
                run["new_seconds"] = time.perf_counter() - started
                started = time.perf_counter()
                log.info("%s %s", key, [round(a, 4) for a in accs])
                save(run, path, args.protocol)
        run["new_seconds"] = time.perf_counter() - started
        run.update(date=time.strftime("%Y-%m-%d"), args={k: v for k, v in vars(args).items() if k != "replot"},
                   environment={"torch": torch.__version__, "python": platform.python_version(), "threads": 1,
                                "machine": platform.machine()})
        save(run, path, args.protocol)
    out = load(path)
    (RESULTS / "data_pruning.md").write_text(markdown(out))
    plot(out, RESULTS / "data_pruning.png")
    log.info("wrote %s.{json,md,png}", path.with_suffix(""))


if __name__ == "__main__":
    main()
