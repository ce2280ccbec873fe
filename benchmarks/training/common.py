"""Shared pieces of the training-time pruning reproductions: Fashion-MNIST subsets, small
models, a plain training loop driven by a SparsityController, and result writing
(JSON with the recipe, a Markdown table, a matplotlib PNG)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prunekit.datasets import load_fashion_mnist  # noqa: E402
from prunekit.training import SparsityController  # noqa: E402

RESULTS = Path(os.environ.get("PRUNEKIT_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
log = logging.getLogger("benchmarks.training")


def setup() -> None:
    torch.set_num_threads(1)  # the machine is shared; every reproduction runs on one thread
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")


def parser(epochs: int, sparsities: list[float] | None = None) -> argparse.ArgumentParser:
    """The options every reproduction shares: seeds, epochs, training-set size, sparsities."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--n-train", type=int, default=10_000)
    if sparsities is not None:
        ap.add_argument("--sparsities", type=float, nargs="+", default=sparsities)
    return ap


def run(name: str, ap: argparse.ArgumentParser, experiment: Callable, report: Callable, title: str) -> None:
    """Parse options, run ``experiment(args, x, y, xt, yt) -> rows`` (or, with ``--replot``,
    reload the rows and recipe of ``results/{name}.json``), then write the table
    ``report(rows, args) -> (markdown, series)`` and the plot of ``series``."""
    ap.add_argument("--replot", action="store_true", help=f"rebuild the table and plot from results/{name}.json")
    args = ap.parse_args()
    setup()
    started = time.time()
    seconds = None
    if args.replot:
        saved = json.loads((RESULTS / f"{name}.json").read_text())
        rows, args, seconds = saved["rows"], argparse.Namespace(**saved["recipe"]), saved["environment"]["seconds"]
    else:
        rows = experiment(args, *data(args.n_train))
    table, series = report(rows, args)
    recipe = {k: v for k, v in vars(args).items() if k != "replot"}
    write(name, recipe, rows, table, lambda path: line_plot(path, series, title),
          seconds if seconds is not None else time.time() - started)


def data(n_train: int = 10_000, n_test: int = 2_000) -> tuple[torch.Tensor, ...]:
    """First ``n_train`` Fashion-MNIST training and first ``n_test`` test images, flattened."""
    x, y = load_fashion_mnist("train", n_train)
    xt, yt = load_fashion_mnist("test", n_test)
    return x.flatten(1), y, xt.flatten(1), yt


def lenet_300_100(seed: int) -> nn.Module:
    """LeNet-300-100, the fully connected network of Frankle & Carbin 2019 (266k weights)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def adam(model: nn.Module, lr: float = 1.2e-3) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)  # Frankle & Carbin's LeNet optimizer


def steps_per_epoch(n: int, batch: int = 128) -> int:
    return (n + batch - 1) // batch


def train(model: nn.Module, opt: torch.optim.Optimizer, ctrl: SparsityController | None, x: torch.Tensor,
          y: torch.Tensor, epochs: int, seed: int, batch: int = 128,
          on_step: Callable[[int], None] | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    step = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            if ctrl is not None:
                ctrl.step()
            if on_step is not None:
                on_step(step)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def weight_sparsity(masks: dict[str, torch.Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def write(name: str, recipe: dict, rows: list[dict], table: str, plot: Callable[[Path], None],
          seconds: float) -> None:
    """``results/{name}.json`` (recipe, environment, raw rows), ``.md`` (table), ``.png``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "seconds": round(seconds, 1)}
    (RESULTS / f"{name}.json").write_text(json.dumps({"recipe": recipe, "environment": meta, "rows": rows}, indent=1))
    (RESULTS / f"{name}.md").write_text(table + f"\n\n_{meta['seconds']} s on {meta['threads']} thread(s), "
                                        f"torch {meta['torch']}; recipe in {name}.json._\n")
    plot(RESULTS / f"{name}.png")
    log.info("wrote %s.{json,md,png} in %.0f s", RESULTS / name, meta["seconds"])


def line_plot(path: Path, series: dict[str, dict[float, list[float]]], title: str, xlabel: str = "sparsity",
              log_density: bool = True) -> None:
    """Mean ± std accuracy per x for each series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours: dict[str, str] = {}
    for label, points in series.items():
        xs = sorted(points)
        means = [100 * mean_std(points[s])[0] for s in xs]
        stds = [100 * mean_std(points[s])[1] for s in xs]
        plot_x = [100 * (1 - s) for s in xs] if log_density else xs
        # "X, shuffled" / "X, no fine-tune" share X's colour, dashed
        base, _, variant = label.partition(", ")
        colour = colours.setdefault(base, f"C{len(colours) % 10}")
        style = "--" if variant in ("shuffled", "no fine-tune") else "-"
        ax.errorbar(plot_x, means, yerr=stds, marker="o", capsize=3, label=label, color=colour, linestyle=style)
    if log_density:
        from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([1, 2, 3, 5, 10, 20, 30, 50, 100]))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_xaxis()
        ax.set_xlabel("weights remaining (%)")
    else:
        ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
