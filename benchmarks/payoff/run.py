"""Pruning that pays off, on real SmolLM2-135M: prune to a parameter budget with the budget
search, with and without distillation from the dense model, against a uniform cut of the same
size (the control: every structure loses the same fraction of its range, no search), then
measure perplexity, parameters, prefill latency and decode tokens/s.

For each target (default 100M, 80M, 60M parameters of the dense 134.5M):
- ``search``: ``budget: {structures: [neurons, heads, layers], target_params: T}`` (the best of
  up to 6 mixes by held-out calibration loss);
- ``uniform``: the same stage with ``candidates: 1`` (the all-structures-equal mix only);
- each then ``+ distill``: a ``recovery: {method: full, distill: {kl: 1}}`` stage of a fixed
  number of steps on the calibration windows, the dense model as the teacher.

Speed comes from one ``prunekit bench`` run over the dense model and every pruned shape
(distillation changes no shape, so a distilled model runs as fast as its undistilled one).
One report page (``prunekit report``) is rendered and screenshotted in headless Chromium.
Writes benchmarks/results/payoff.{json,md,png}, payoff_bench.json, payoff_report.png.

    .venv/bin/python benchmarks/payoff/run.py                         # ~75 min on 2 cores
    .venv/bin/python benchmarks/payoff/run.py --targets 100000000 --steps 10 --eval-tokens 2048
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def _ppl(model: Any, tokenizer: Any, tokens: int) -> float:
    from prunekit import evaluate_perplexity

    return evaluate_perplexity(model, tokenizer, "default", seqlen=256, max_tokens=tokens, progress=False).perplexity


def _save(result: Any, path: Path, dense_ppl: float, ppl: float, tokens: int) -> None:
    result.save(path, overwrite=True)
    record = {"eval": "default", "seqlen": 256, "eval_max_tokens": tokens, "tokens": tokens,
              "perplexity_before": dense_ppl, "perplexity": ppl, "dense_eval_cached": False}
    (path / "prunekit_eval.json").write_text(json.dumps(record, indent=2) + "\n")


def run_all(args: argparse.Namespace, runs: Path) -> dict[str, Any]:
    import torch

    import prunekit
    from prunekit.recipe import CalibrationSpec, Recipe
    from prunekit.stages import RecoveryStage
    from prunekit.structural.budget import BudgetStage

    torch.manual_seed(0)
    dense = prunekit.load("default")
    tok = dense.tokenizer
    spec = CalibrationSpec("default", nsamples=args.nsamples, seqlen=256, seed=0, batch_size=4)
    dense_ppl = _ppl(dense.model, tok, args.eval_tokens)
    dense_params = sum(p.numel() for p in dense.model.parameters())
    print(f"dense: {dense_params:,} params, perplexity {dense_ppl:.2f}", flush=True)
    rows: list[dict[str, Any]] = []
    for target in args.targets:
        for variant, candidates in (("search", args.candidates), ("uniform", 1)):
            t0 = time.perf_counter()
            stage = BudgetStage(target_params=target, candidates=candidates, search_samples=8, eval_samples=4)
            pruned = prunekit.run(Recipe((stage,), spec), copy.deepcopy(dense.model), tokenizer=tok, progress=False)
            seconds = time.perf_counter() - t0
            ppl = _ppl(pruned.model, tok, args.eval_tokens)
            name = f"{target // 1_000_000}M-{variant}"
            _save(pruned, runs / name, dense_ppl, ppl, args.eval_tokens)
            b = pruned.report["stages"][0]
            rows.append({"target": target, "variant": variant, "recovery": "none", "params": b["params_after"],
                         "perplexity": ppl, "chosen": b["chosen"], "candidates": len(b["candidates"]),
                         "seconds": seconds, "dir": name})
            print(json.dumps(rows[-1]), flush=True)
            t0 = time.perf_counter()
            recovery = RecoveryStage("full", steps=args.steps, lr=args.lr, distill={"kl": 1.0, "teacher": "default"})
            distilled = prunekit.run(Recipe((recovery,), spec), pruned, tokenizer=tok, progress=False)
            seconds = time.perf_counter() - t0
            ppl_d = _ppl(distilled.model, tok, args.eval_tokens)
            _save(distilled, runs / f"{name}-distill", dense_ppl, ppl_d, args.eval_tokens)
            r = distilled.report["stages"][-1]
            # params: the pruned model's (the saved directory adds zero biases a config's bias switch needs)
            rows.append({"target": target, "variant": variant, "recovery": f"distill {args.steps} steps",
                         "params": b["params_after"], "params_stored": r["params_after"], "perplexity": ppl_d, "chosen": b["chosen"],
                         "kl_first": r["loss_curve"]["kl"][0], "kl_last": r["loss_curve"]["kl"][-1],
                         "seconds": seconds, "dir": f"{name}-distill"})
            print(json.dumps(rows[-1]), flush=True)
    return {"dense": {"params": dense_params, "perplexity": dense_ppl}, "rows": rows,
            "settings": {"calibration": f"{args.nsamples} x 256 tokens of the bundled corpus",
                         "eval_tokens": args.eval_tokens, "distill": {"method": "full", "steps": args.steps,
                                                                      "lr": args.lr, "kl": 1.0, "batch": 4},
                         "candidates": args.candidates}}


def bench(runs: Path, names: list[str]) -> dict[str, Any]:
    out = RESULTS / "payoff_bench.json"
    cmd = [sys.executable, "-m", "prunekit.cli", "bench", "default", *[str(runs / n) for n in names],
           "--prompt-tokens", "128", "--decode-tokens", "16", "--batch", "1", "8", "--repeats", "3",
           "--no-peak-memory", "--output", str(out), "--quiet"]
    text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    (RESULTS / "payoff_bench.txt").write_text(text)
    return json.loads(out.read_text())


def screenshot(run_dir: Path) -> Path | None:
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                   None)
    subprocess.run([sys.executable, "-m", "prunekit.cli", "report", str(run_dir), "--quiet"], check=True)
    if browser is None:
        return None
    png = RESULTS / "payoff_report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                    "--window-size=1200,3000", (run_dir / "prunekit_report.html").as_uri()], check=True,
                   capture_output=True, timeout=120)
    return png


def _speed(bench_json: dict[str, Any], runs: Path) -> dict[str, dict[str, Any]]:
    """prefill ms and decode tokens/s per run directory name (and 'dense')."""
    out = {}
    for row in bench_json["models"]:
        name = "dense" if row["label"] == "default" else Path(row["label"]).name
        out[name] = {"prefill_ms": row["prefill_ms"], "decode_tokens_per_s": row["decode_tokens_per_s"],
                     "prefill_vs_dense": row["prefill_vs_first"], "decode_vs_dense": row["decode_vs_first"],
                     "params_total": row["params_total"]}
    return out


def write(result: dict[str, Any], speed: dict[str, dict[str, Any]]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "payoff.json").write_text(json.dumps({**result, "speed": speed}, indent=2, default=str) + "\n")
    d = result["dense"]
    lines = ["| target | cut | recovery | params | perplexity | prefill ms (1x128) | decode tok/s (b1) | "
             "decode tok/s (b8) | removed per group |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    s = speed.get("dense", {})
    lines.append(f"| dense | | | {d['params'] / 1e6:.1f}M | {d['perplexity']:.2f} | {_fmt(s, 'prefill_ms')} | "
                 f"{_fmt(s, 'decode', 1)} | {_fmt(s, 'decode', 8)} | |")
    for r in result["rows"]:
        s = speed.get(r["dir"].removesuffix("-distill"), {})
        chosen = ", ".join(f"{k} {v}" for k, v in r["chosen"].items() if k != "mix")
        lines.append(f"| {r['target'] / 1e6:.0f}M | {r['variant']} | {r['recovery']} | {r['params'] / 1e6:.1f}M | "
                     f"{r['perplexity']:.2f} | {_fmt(s, 'prefill_ms')} | {_fmt(s, 'decode', 1)} | "
                     f"{_fmt(s, 'decode', 8)} | {chosen} |")
    (RESULTS / "payoff.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(result)


def _fmt(row: dict[str, Any], key: str, batch: int | None = None) -> str:
    if not row:
        return "n/a"
    if key == "prefill_ms":
        v, ratio = row["prefill_ms"], row["prefill_vs_dense"]
    else:
        v, ratio = row["decode_tokens_per_s"][str(batch)], row["decode_vs_dense"][str(batch)]
    return f"{v:,.1f} ({ratio:.2f}x)"


def _plot(result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (variant, recovery), style in {("search", "none"): "o-", ("search", "distill"): "o--",
                                       ("uniform", "none"): "s-", ("uniform", "distill"): "s--"}.items():
        pts = sorted((r["params"] / 1e6, r["perplexity"]) for r in result["rows"]
                     if r["variant"] == variant and r["recovery"].startswith(recovery))
        if pts:
            ax.plot(*zip(*pts), style, label=f"{variant}{' + distill' if recovery == 'distill' else ''}")
    ax.axhline(result["dense"]["perplexity"], color="grey", lw=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("SmolLM2-135M pruned to a parameter budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "payoff.png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", type=int, nargs="+", default=[100_000_000, 80_000_000, 60_000_000])
    p.add_argument("--steps", type=int, default=40, help="distillation steps (batches of 4 x 256 tokens)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--candidates", type=int, default=6)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--runs", default="/tmp/prunekit-payoff", help="where the pruned models are saved")
    args = p.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    result = run_all(args, runs)
    names = [r["dir"] for r in result["rows"] if r["recovery"] == "none"]
    speed = _speed(bench(runs, names), runs)
    write(result, speed)
    best = min((r for r in result["rows"] if r["variant"] == "search" and r["recovery"] != "none"),
               key=lambda r: r["target"])
    png = screenshot(runs / best["dir"])
    print(f"report screenshot: {png}")


if __name__ == "__main__":
    main()
