"""Structural pruning: physically removed channels, neurons and layers -> size, MACs, CPU latency, quality.

Three parts, each writing its own entry of ``benchmarks/results/structural.json`` (a part run
alone replaces only its entry) and the whole Markdown table file ``structural.md``:

- ``cnn``: SmallCNN trained here on a Fashion-MNIST subset (cached), 50% of conv channels
  removed (L2), test accuracy right after and after a one-epoch fine-tune; params, MACs,
  CPU latency at batch 64 and 1; accuracy right after pruning for every prunekit score.
- ``tp``: the same trained CNN pruned by Torch-Pruning's MagnitudePruner (L2, same ratio,
  same frozen layers), next to prunekit: params, MACs, latency, time to prune, accuracy.
- ``llm``: real SmolLM2-135M, 20% of MLP neurons (l2, random control, wanda, flap) and 25%
  of layers (block influence, random control) removed: perplexity on the bundled evaluation
  text, 1x128-token CPU latency, parameter and MAC counts before/after.

Everything runs on one CPU thread (the machine is shared). Latencies: models timed in
interleaved rounds in one process, so they see the same machine load; the median is the
headline, the fastest repeat is kept too (less sensitive to preemption on a busy machine).

    .venv/bin/python benchmarks/structural.py                   # all parts (~12 min on 1 thread)
    .venv/bin/python benchmarks/structural.py --part cnn tp     # ~1 min once the CNN is trained
    .venv/bin/python benchmarks/structural.py --part llm --neuron-methods flap --layer-methods block_influence
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from prunekit.evaluate import latencies_ms  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ measuring


def graph_macs(model: nn.Module, example: Any) -> int:
    """MACs of one forward on ``example`` as prunekit's tracer counts them."""
    from prunekit.structural import build_graph

    return int(build_graph(model, example).macs)


# ------------------------------------------------------------------------------ the CNN


def fashion_mnist(train_limit: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from prunekit.datasets import load_fashion_mnist

    x, y = load_fashion_mnist("train", train_limit)
    xt, yt = load_fashion_mnist("test")
    return x, y, xt, yt


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float, seed: int, batch: int = 128) -> float:
    """Adam with a cosine learning-rate decay over all steps; returns the seconds it took."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=g)
        total = 0.0
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log(f"  epoch {epoch + 1}/{epochs}: train loss {total / len(y):.4f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    return time.perf_counter() - start


@torch.inference_mode()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    return correct / len(y)


def trained_cnn(args: argparse.Namespace, x: Tensor, y: Tensor) -> tuple[nn.Module, float]:
    """SmallCNN trained on the subset; cached (state dict + training seconds, no pickled code)
    under the prunekit cache, keyed by its recipe, so that parts run separately prune the
    same weights."""
    from prunekit.models.loading import cache_root
    from prunekit.models.zoo import SmallCNN

    key = f"smallcnn-w{args.width}-n{args.train_limit}-e{args.epochs}-lr{args.lr}-s{args.seed}.pt"
    path = cache_root() / "bench" / key
    torch.manual_seed(args.seed)
    model = SmallCNN(width=args.width)
    if path.is_file() and not args.retrain:
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        log(f"loaded the trained CNN from {path}")
        return model.eval(), float(saved["train_seconds"])
    log(f"training SmallCNN (width {args.width}) on {len(y)} images for {args.epochs} epochs")
    seconds = train(model, x, y, args.epochs, args.lr, args.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "train_seconds": seconds}, path)
    return model.eval(), seconds


def prunekit_channels(model: nn.Module, ratio: float, example: Tensor, method: str = "l2",
                      data: tuple[Tensor, Tensor] | None = None) -> tuple[dict[str, Any], float]:
    """prunekit: remove ``ratio`` of every conv-channel group (uniform allocation); the
    classifier's outputs reach the model output, so they are never candidates."""
    from prunekit.structural import StructureConfig, prune_structure

    start = time.perf_counter()
    cfg = StructureConfig(structure="channels", ratio=ratio, method=method, batch_size=128)
    result = prune_structure(model, cfg, example_inputs=example, data=data)
    return dict(result.report), time.perf_counter() - start


def score_comparison(args: argparse.Namespace, dense: nn.Module, x: Tensor, y: Tensor, xt: Tensor,
                     yt: Tensor) -> list[dict[str, Any]]:
    """Test accuracy right after removing the same ratio of channels with each prunekit score
    (no fine-tune). Data-aware scores get the first ``--score-samples`` training images."""
    rows = []
    data = (x[: args.score_samples], y[: args.score_samples])
    for method in args.cnn_methods:
        m = copy.deepcopy(dense)
        _, seconds = prunekit_channels(m, args.ratio, xt[:1], method, data)
        rows.append({"method": method, "accuracy": accuracy(m, xt, yt), "seconds": seconds, "params": n_params(m)})
        log(f"  {method}: accuracy {rows[-1]['accuracy']:.4f} ({seconds:.2f} s)")
    return rows


def prepare_cnn(args: argparse.Namespace) -> dict[str, Any]:
    """Data, the trained dense CNN and its prunekit-pruned copy (no fine-tune), shared by cnn and tp."""
    x, y, xt, yt = fashion_mnist(args.train_limit)
    dense, train_seconds = trained_cnn(args, x, y)
    dense_acc = accuracy(dense, xt, yt)
    log(f"dense test accuracy {dense_acc:.4f}")
    runs = [(m, *prunekit_channels(m, args.ratio, xt[:1])) for m in (copy.deepcopy(dense) for _ in range(3))]
    pruned, report, _ = runs[-1]
    seconds = min(r[2] for r in runs)  # the first call also pays one-off warm-up costs
    pruned_acc = accuracy(pruned, xt, yt)
    log(f"prunekit: {n_params(dense)} -> {n_params(pruned)} params, accuracy {pruned_acc:.4f} ({seconds:.2f} s)")
    scores = score_comparison(args, dense, x, y, xt, yt) if args.cnn_methods else []
    return {"x": x, "y": y, "xt": xt, "yt": yt, "dense": dense, "dense_accuracy": dense_acc,
            "train_seconds": train_seconds, "pruned": pruned, "prunekit_seconds": seconds,
            "prunekit_accuracy": pruned_acc, "report": report,
            "latency_models": {"dense": dense, "prunekit": pruned}, "scores": scores}


def cnn_part(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    dense, pruned, one = state["dense"], state["pruned"], state["xt"][:1]
    tuned = copy.deepcopy(pruned)
    ft_seconds = train(tuned, state["x"], state["y"], args.finetune_epochs, args.finetune_lr, args.seed + 1)
    tuned_acc = accuracy(tuned, state["xt"], state["yt"])
    log(f"fine-tuned accuracy {tuned_acc:.4f}")
    state["latency_models"]["prunekit"] = tuned  # same shapes as the pruned model, so the same speed
    report = state["report"]
    return {
        "model": f"SmallCNN(width={args.width})", "train_images": len(state["y"]), "test_images": len(state["yt"]),
        "epochs": args.epochs, "lr": args.lr, "finetune_epochs": args.finetune_epochs,
        "finetune_lr": args.finetune_lr, "ratio": args.ratio, "method": "l2", "seed": args.seed,
        "train_seconds": state["train_seconds"], "finetune_seconds": ft_seconds,
        "prune_seconds": state["prunekit_seconds"], "dense_accuracy": state["dense_accuracy"],
        "pruned_accuracy": state["prunekit_accuracy"], "finetuned_accuracy": tuned_acc,
        "params_before": n_params(dense), "params_after": n_params(pruned),
        "macs_before": graph_macs(dense, one), "macs_after": graph_macs(pruned, one),
        "report": {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool))},
        "groups": report.get("groups"), "scores_no_finetune": state["scores"], "score_samples": args.score_samples,
    }


def cnn_latency(models: dict[str, nn.Module], args: argparse.Namespace) -> dict[str, Any]:
    """``batch64`` / ``batch1``: median ms per forward; ``batch64_min`` / ``batch1_min``: the fastest repeat."""
    out: dict[str, Any] = {"load_average_before": os.getloadavg()[0]}
    # one forward per timing even at batch 1: on a shared machine a longer timed stretch is
    # more likely to be preempted, which penalises the slower model
    for batch, repeats in ((64, args.repeats), (1, args.repeats * 20)):
        x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        times = latencies_ms(models, lambda: x, repeats, stat=None)
        out[f"batch{batch}"] = {k: statistics.median(v) for k, v in times.items()}
        out[f"batch{batch}_min"] = {k: min(v) for k, v in times.items()}
        log(f"latency batch {batch} (median / min): " + ", ".join(
            f"{k} {out[f'batch{batch}'][k]:.3f} / {out[f'batch{batch}_min'][k]:.3f} ms" for k in times))
    out["load_average_after"] = os.getloadavg()[0]
    return out


# ------------------------------------------------------------------------------ Torch-Pruning


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def tp_part(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    try:
        import torch_pruning as tp
    except Exception as exc:  # noqa: BLE001 - record whatever stops it from importing
        return {"available": False, "error": f"{type(exc).__name__}: {exc}"}
    dense, ours = state["dense"], state["pruned"]
    one = state["xt"][:1]
    seconds = float("inf")
    for _ in range(3):  # best of three, as for prunekit
        model = copy.deepcopy(dense)
        # prunekit's "channels" removes conv channels only; fc1's neurons are a separate structure,
        # so Torch-Pruning gets fc1 (a root it would otherwise prune) and the classifier frozen.
        ignored = [model.fc1, model.fc2]
        start = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(model, one, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=args.ratio, ignored_layers=ignored)
        pruner.step()
        seconds = min(seconds, time.perf_counter() - start)
    acc = accuracy(model, state["xt"], state["yt"])
    tp_macs, tp_params = tp.utils.count_ops_and_params(model, one)
    tp_macs_dense, _ = tp.utils.count_ops_and_params(dense, one)
    tp_macs_ours, _ = tp.utils.count_ops_and_params(ours, one)
    log(f"torch-pruning: {n_params(dense)} -> {n_params(model)} params, accuracy {acc:.4f} ({seconds:.2f} s)")
    state["latency_models"]["torch_pruning"] = model
    shapes_equal = [tuple(p.shape) for p in model.parameters()] == [tuple(p.shape) for p in ours.parameters()]
    same_weights = shapes_equal and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                           ours.state_dict().values()))
    return {
        "available": True, "version": _dist_version("torch-pruning"), "ratio": args.ratio,
        "importance": "MagnitudeImportance(p=2), group mean", "ignored": ["fc1", "fc2"],
        "params": {"dense": n_params(dense), "prunekit": n_params(ours), "torch_pruning": n_params(model)},
        "macs_prunekit_counter": {"dense": graph_macs(dense, one), "prunekit": graph_macs(ours, one),
                                  "torch_pruning": graph_macs(model, one)},
        "macs_tp_counter": {"dense": int(tp_macs_dense), "prunekit": int(tp_macs_ours), "torch_pruning": int(tp_macs)},
        "prune_seconds": {"prunekit": state["prunekit_seconds"], "torch_pruning": seconds},
        "accuracy_no_finetune": {"dense": accuracy(dense, state["xt"], state["yt"]),
                                 "prunekit": state["prunekit_accuracy"], "torch_pruning": acc},
        "same_shapes": shapes_equal, "same_channels_kept": same_weights,
    }


# ------------------------------------------------------------------------------ SmolLM2


def llm_part(args: argparse.Namespace) -> dict[str, Any]:
    from prunekit.api import evaluate_perplexity
    from prunekit.calibration.text import calibration_windows, load_text, tokenize
    from prunekit.models.loading import load_model
    from prunekit.structural import StructureConfig, prune_structure

    model, tok, _ = load_model("default")
    model.eval()
    calib = calibration_windows(tokenize(tok, load_text("default", "calib")), args.llm_calib, args.llm_seqlen, 0)
    x128 = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))

    def ppl(m: nn.Module) -> float:
        return evaluate_perplexity(m, tok, "default", seqlen=args.llm_seqlen, max_tokens=args.eval_tokens,
                                   progress=False).perplexity

    dense_ppl = ppl(model)
    log(f"dense perplexity {dense_ppl:.3f}")
    rows, models = [], {"dense": model}
    jobs = [("neurons", args.neuron_ratio, m) for m in args.neuron_methods]
    jobs += [("layers", args.layer_ratio, m) for m in args.layer_methods]
    for structure, ratio, method in jobs:
        key = f"{structure}:{method}"
        m = copy.deepcopy(model)
        start = time.perf_counter()
        result = prune_structure(m, StructureConfig(structure=structure, ratio=ratio, method=method),
                                 example_inputs=x128, data=calib)
        seconds = time.perf_counter() - start
        p = ppl(m)
        log(f"{structure} {ratio}: perplexity {p:.3f}, {n_params(model)} -> {n_params(m)} params ({seconds:.1f} s)")
        rows.append({"key": key, "structure": structure, "ratio": ratio, "method": method, "perplexity": p,
                     "params": n_params(m), "prune_seconds": seconds,
                     "report": {k: v for k, v in result.report.items() if isinstance(v, (int, float, str, bool))},
                     "groups": result.report.get("groups")})
        models[key] = m
    load_before = os.getloadavg()[0]
    times = latencies_ms(models, lambda: {"input_ids": x128, "use_cache": False}, args.llm_repeats, stat=None)
    lat = {k: statistics.median(v) for k, v in times.items()}
    for row in rows:
        row["latency_ms"] = lat[row["key"]]
        row["latency_min_ms"] = min(times[row["key"]])
    log("latency 1x128: " + ", ".join(f"{k} {v:.1f} ms" for k, v in lat.items()))
    return {"model": "SmolLM2-135M-Instruct (default)", "eval_tokens": args.eval_tokens, "seqlen": args.llm_seqlen,
            "calib_windows": args.llm_calib, "dense_perplexity": dense_ppl, "dense_params": n_params(model),
            "dense_latency_ms": lat["dense"], "dense_latency_min_ms": min(times["dense"]),
            "load_average": [load_before, os.getloadavg()[0]], "rows": rows}


# ------------------------------------------------------------------------------ tables


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a and b else ""


def markdown(r: dict[str, Any]) -> str:
    env = r.get("env", {})
    lines = [f"Structural pruning benchmark ({env.get('torch', '?')}, {env.get('threads', 1)} CPU thread, "
             f"{env.get('cpu', '?')}). Latency: median over interleaved repeats in one process; the machine "
             "was shared, so ratios are more trustworthy than absolute times.", ""]
    if "cnn" in r:
        c = r["cnn"]
        lat = c["latency_ms"]
        lines += [f"### Fashion-MNIST {c['model']}: {c['ratio']:.0%} of conv channels removed ({c['method']})", "",
                  f"Trained on {c['train_images']} images for {c['epochs']} epochs, fine-tuned {c['finetune_epochs']} "
                  f"epoch(s) on the same images; accuracy on all {c['test_images']} test images. MACs per image.", "",
                  "| model | params | MACs | accuracy | latency b64 (ms) | latency b1 (ms) |",
                  "|---|---:|---:|---:|---:|---:|",
                  f"| dense | {c['params_before']:,} | {c['macs_before']:,} | {c['dense_accuracy']:.4f} | "
                  f"{lat['batch64']['dense']:.2f} | {lat['batch1']['dense']:.3f} |",
                  f"| pruned, no fine-tune | {c['params_after']:,} | {c['macs_after']:,} | {c['pruned_accuracy']:.4f} | | |",
                  f"| pruned + fine-tune | {c['params_after']:,} | {c['macs_after']:,} | {c['finetuned_accuracy']:.4f} | "
                  f"{lat['batch64']['prunekit']:.2f} | {lat['batch1']['prunekit']:.3f} |",
                  f"| ratio pruned/dense | {c['params_after'] / c['params_before']:.3f} | "
                  f"{c['macs_after'] / c['macs_before']:.3f} | | "
                  f"{lat['batch64']['prunekit'] / lat['batch64']['dense']:.3f} | "
                  f"{lat['batch1']['prunekit'] / lat['batch1']['dense']:.3f} |", "",
                  f"Pruning took {c['prune_seconds']:.2f} s (best of 3, graph trace included), fine-tuning {c['finetune_seconds']:.0f} s. "
                  "The pruned model has the same shapes with or without the fine-tune, so one latency serves both.", ""]
        if "load_average_before" in lat:
            lines += [f"1-minute load average on the 2-core machine while timing: {lat['load_average_before']:.1f} "
                      f"before, {lat['load_average_after']:.1f} after.", ""]
        if "batch64_min" in lat:
            lines += ["Fastest repeat instead of the median, pruned/dense: " + ", ".join(
                f"batch {b} {lat[f'batch{b}_min']['prunekit']:.3f} / {lat[f'batch{b}_min']['dense']:.3f} ms = "
                f"{lat[f'batch{b}_min']['prunekit'] / lat[f'batch{b}_min']['dense']:.3f}" for b in (64, 1)) + ".", ""]
        if c.get("scores_no_finetune"):
            lines += [f"Accuracy right after removing {c['ratio']:.0%} of channels, no fine-tune, by prunekit score "
                      f"(data-aware scores use {c.get('score_samples')} training images):", "",
                      "| score | accuracy | prune s |", "|---|---:|---:|"]
            lines += [f"| {row['method']} | {row['accuracy']:.4f} | {row['seconds']:.2f} |" for row in c["scores_no_finetune"]]
            lines.append("")
    if "tp" in r:
        t = r["tp"]
        if not t.get("available"):
            lines += ["### Torch-Pruning", "", f"Not run: {t.get('error')}", ""]
        else:
            lat = t["latency_ms"]
            lines += [f"### Same trained CNN: prunekit vs Torch-Pruning {t['version']} ({t['ratio']:.0%} channels, L2, "
                      f"{', '.join(t['ignored'])} frozen, no fine-tune)", "",
                      "| | params | MACs (prunekit count) | MACs (TP count) | prune s | accuracy | latency b64 (ms) | latency b1 (ms) |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for k in ("dense", "prunekit", "torch_pruning"):
                sec = f"{t['prune_seconds'][k]:.3f}" if k in t["prune_seconds"] else ""
                lines.append(f"| {k} | {t['params'][k]:,} | {t['macs_prunekit_counter'][k]:,} | "
                             f"{t['macs_tp_counter'][k]:,} | {sec} | {t['accuracy_no_finetune'][k]:.4f} | "
                             f"{lat['batch64'][k]:.2f} | {lat['batch1'][k]:.3f} |")
            lines += ["", f"Identical pruned shapes: {t['same_shapes']}; identical kept channels (all weights equal): "
                      f"{t.get('same_channels_kept')}. Torch-Pruning's MagnitudeImportance sums squared weights per layer "
                      "(BatchNorm scale, not its running statistics), normalises each layer by its mean and averages over "
                      "the coupled layers; prunekit's l2 is the root of the sum of squares over all the unit's weight "
                      "slices (running statistics excluded), without per-layer normalisation. Torch-Pruning's MAC counter also counts BatchNorm, ReLU and pooling, hence its larger MACs. "
                      "Prune seconds: best of 3, tracing included.", ""]
    if "llm" in r:
        m = r["llm"]
        lines += [f"### {m['model']}: perplexity on {m['eval_tokens']} tokens of the bundled evaluation text "
                  f"(windows of {m['seqlen']}), latency of one 1x128-token forward", "",
                  "| model | method | params | param ratio | MAC ratio | perplexity | latency (ms) | latency ratio | "
                  "latency ratio, fastest repeat | prune s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| dense | | {m['dense_params']:,} | 1.000 | 1.000 | {m['dense_perplexity']:.3f} | "
                  f"{m['dense_latency_ms']:.1f} | 1.000 | 1.000 | |"]
        for row in m["rows"]:
            lines.append(f"| {row['ratio']:.0%} of {'MLP neurons' if row['structure'] == 'neurons' else 'layers'} "
                         f"removed | {row['method']} | {row['params']:,} | "
                         f"{row['params'] / m['dense_params']:.3f} | "
                         f"{row['report']['macs_after'] / row['report']['macs_before']:.3f} | {row['perplexity']:.3f} | {row['latency_ms']:.1f} | "
                         f"{row['latency_ms'] / m['dense_latency_ms']:.3f} | "
                         f"{_ratio(row.get('latency_min_ms'), m.get('dense_latency_min_ms'))} | {row['prune_seconds']:.1f} |")
        if "load_average" in m:
            lines.append(f"- 1-minute load average while timing: {m['load_average'][0]:.1f} before, "
                         f"{m['load_average'][1]:.1f} after (2 cores, shared).")
        for row in m["rows"]:
            g = (row.get("groups") or [{}])[0]
            if row["structure"] == "layers" and "removed_indices" in g:
                lines.append(f"- {row['method']}: removed {g['removed']} of {g['units_before']} layers "
                             f"(indices {g['removed_indices']}).")
        ppl = {row["method"]: row["perplexity"] for row in m["rows"] if row["structure"] == "neurons"}
        if "l2" in ppl and "random" in ppl and ppl["l2"] > ppl["random"]:
            lines.append("- The data-free l2 score (weight norms of gate/up rows and down columns) does worse than "
                         "the seeded random control on this model; the activation-aware scores do not.")
        lines += ["- Parameter counts include the 28.3M-parameter tied embedding / LM head, which no structure here "
                  "removes; the latency includes the LM-head matmul over the 49152-token vocabulary.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", choices=["cnn", "tp", "llm", "all"], default=["all"],
                   help="one or more parts (default all)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--train-limit", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--cnn-methods", nargs="*", default=["l2", "l1", "bn_scale", "taylor", "random"],
                   help="prunekit scores compared on the CNN, no fine-tune")
    p.add_argument("--score-samples", type=int, default=1024, help="training images for data-aware CNN scores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="ignore the cached trained CNN")
    p.add_argument("--repeats", type=int, default=100, help="latency rounds at batch 64 (x4 at batch 1)")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--llm-seqlen", type=int, default=512)
    p.add_argument("--llm-calib", type=int, default=8, help="calibration windows for the LLM scores")
    p.add_argument("--llm-repeats", type=int, default=20)
    p.add_argument("--neuron-ratio", type=float, default=0.2)
    p.add_argument("--neuron-methods", nargs="*", default=["l2", "random", "wanda", "flap"])
    p.add_argument("--layer-ratio", type=float, default=0.25)
    p.add_argument("--layer-methods", nargs="*", default=["block_influence", "random"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "structural"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    out_json = Path(args.out + ".json")
    result: dict[str, Any] = json.loads(out_json.read_text()) if out_json.is_file() else {}
    result["env"] = {"torch": f"torch {torch.__version__}", "threads": args.threads,
                     "cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
    parts = {"cnn", "tp", "llm"} if "all" in args.part else set(args.part)
    if parts & {"cnn", "tp"}:
        state = prepare_cnn(args)
        if "cnn" in parts:
            result["cnn"] = cnn_part(args, state)
        if "tp" in parts:
            result["tp"] = tp_part(args, state)
        # one interleaved measurement for every CNN, so both tables share the same machine load
        lat = cnn_latency(state["latency_models"], args)
        for part in parts & {"cnn", "tp"}:
            if result[part].get("available", True):
                result[part]["latency_ms"] = lat
        write(result, args.out)  # a later part that fails keeps these
    if "llm" in parts:
        result["llm"] = llm_part(args)
        write(result, args.out)
    print(markdown(result))


def write(result: dict[str, Any], out: str) -> None:
    """JSON and Markdown, each written to a temporary name and renamed into place."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((Path(out + ".json"), json.dumps(result, indent=2)), (Path(out + ".md"), markdown(result))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)


if __name__ == "__main__":
    main()
