"""One-shot pruning of SmolLM2-135M: method x pattern -> perplexity, seconds, peak memory.

Every run is a fresh process (``prunekit prune ... --json``) so peak RSS is per run, then
``prunekit eval`` scores the saved model on the bundled evaluation text. When llm-compressor
is importable by ``--llmc-python`` (default: ./.venv-llmc/bin/python if present), the same
Wanda/SparseGPT jobs run through it on the same calibration windows and the table shows the
time and memory ratios. The machine's fp32 matmul rate is measured first, to put the times
next to a compute bound.

    .venv/bin/python benchmarks/llm_oneshot.py            # full table (~30-40 min on 2 cores)
    .venv/bin/python benchmarks/llm_oneshot.py --methods wanda --patterns 2:4 --eval-tokens 4096
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run_json(cmd: list[str]) -> dict[str, Any]:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


FORWARD = """
import json, sys, time, torch
from prunekit.api import calibration_data
from prunekit.config import Calibration, PruneConfig
from prunekit.models.loading import load_model
model, tok, _ = load_model(sys.argv[1])
cfg = PruneConfig(calibration=Calibration(nsamples=int(sys.argv[2]), seqlen=int(sys.argv[3])))
ids = calibration_data(tok, "default", cfg)
with torch.no_grad():
    model.model(input_ids=ids[:1], use_cache=False)
    for p in model.parameters():
        p.mul_(1.0)  # page the weights in, as pruning does, outside the timed region
    t = time.perf_counter()
    for b in ids.split(4):
        model.model(input_ids=b, use_cache=False)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def plain_forward_seconds(py: str, model_dir: str, nsamples: int, seqlen: int) -> float:
    """Wall time of one plain forward of the blocks over the calibration windows (batches of 4,
    no hooks): the real cost of the one pass a single-pass pruner needs, measured in this run."""
    return run_json([py, "-c", FORWARD, model_dir, str(nsamples), str(seqlen)])["seconds"]


def job_gflop(model_dir: str, tokens: int, seqlen: int) -> dict[str, float]:
    """FLOPs of one forward over the calibration tokens through all blocks, and of the Hessians
    (one X^T X per distinct layer input), from the model's config."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    hd = getattr(c, "head_dim", None) or h // c.num_attention_heads
    kv = c.num_key_value_heads * hd
    q = c.num_attention_heads * hd
    linear = h * q + 2 * h * kv + q * h + 3 * h * i  # q, k, v, o, gate, up, down MACs per token
    attention = seqlen * q  # QK^T and PV MACs per token, halved for causality
    forward = 2 * tokens * (linear + attention) * layers / 1e9
    hessian = 2 * tokens * (3 * h * h + i * i) * layers / 1e9  # inputs of qkv, o, gate/up, down
    return {"forward_gflop": forward, "hessian_gflop": hessian}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    p.add_argument("--block-order", nargs="*", default=["wanda", "sparsegpt"],
                   help="methods also run with --sequential block (two passes, less memory), unstructured")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=None, help="default: the whole bundled evaluation text")
    p.add_argument("--llmc-python", default=str(ROOT / ".venv-llmc" / "bin" / "python"))
    p.add_argument("--no-llmc", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "llm_oneshot"))
    args = p.parse_args()

    py = sys.executable
    from prunekit.models.loading import resolve

    model_dir = resolve(args.model)
    gflops = matmul_gflops()
    work = job_gflop(model_dir, args.nsamples * args.seqlen, args.seqlen)
    forward_s = plain_forward_seconds(py, model_dir, args.nsamples, args.seqlen)
    bound = {  # seconds: FLOPs at the measured matmul rate, and the measured plain forward
        "one_forward": work["forward_gflop"] / gflops,
        "one_forward_plus_hessians": (work["forward_gflop"] + work["hessian_gflop"]) / gflops,
        "measured_plain_forward": forward_s,
    }
    llmc = not args.no_llmc and Path(args.llmc_python).exists() and subprocess.run(
        [args.llmc_python, "-c", "import llmcompressor"], capture_output=True).returncode == 0
    eval_flags = ["--seqlen", str(args.seqlen), "--json", "--quiet"]
    if args.eval_tokens:
        eval_flags += ["--max-tokens", str(args.eval_tokens)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prunekit-bench-") as tmp:
        dense = run_json([py, "-m", "prunekit.cli", "eval", model_dir, *eval_flags])
        jobs = [(m, p, "layer") for m in args.methods for p in args.patterns]
        jobs += [(m, "unstructured", "block") for m in args.block_order]
        for method, pattern, order in jobs:
            out = os.path.join(tmp, f"{method}-{pattern.replace(':', 'of')}-{order}")
            r = run_json([py, "-m", "prunekit.cli", "prune", model_dir, "--method", method, "--pattern", pattern,
                          "--sparsity", str(args.sparsity), "--nsamples", str(args.nsamples),
                          "--seqlen", str(args.seqlen), "--sequential", order, "--output", out, "--json", "--quiet"])
            e = run_json([py, "-m", "prunekit.cli", "eval", out, *eval_flags])
            flop_bound = bound["one_forward_plus_hessians" if method == "sparsegpt" else "one_forward"]
            row = {"method": method, "pattern": pattern, "order": order, "perplexity": e["perplexity"],
                   "sparsity": r["sparsity"], "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
                   "x_flop_bound": r["seconds"] / flop_bound, "x_plain_forward": r["seconds"] / forward_s}
            if llmc and method in ("wanda", "sparsegpt") and order == "layer":
                lout = out + "-llmc"
                lr = run_json([args.llmc_python, str(ROOT / "benchmarks" / "llmcompressor_run.py"), "--method", method,
                               "--pattern", pattern, "--sparsity", str(args.sparsity), "--nsamples", str(args.nsamples),
                               "--seqlen", str(args.seqlen), "--model", model_dir, "--output", lout, "--json"])
                le = run_json([py, "-m", "prunekit.cli", "eval", lout, *eval_flags])
                row.update(llmc_perplexity=le["perplexity"], llmc_seconds=lr["seconds"],
                           llmc_peak_rss_mb=lr["peak_rss_mb"], llmc_oneshot_peak_rss_mb=lr.get("oneshot_peak_rss_mb"),
                           llmc_version=lr.get("version"),
                           time_ratio=r["seconds"] / lr["seconds"], memory_ratio=r["peak_rss_mb"] / lr["peak_rss_mb"])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "sparsity": args.sparsity,
              "dense_perplexity": dense["perplexity"], "eval_tokens": dense["tokens"], "matmul_gflops": gflops,
              **work, "bound_seconds": bound, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(result) + "\n")
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    has_llmc = any("llmc_seconds" in row for row in r["rows"])
    head = "| method | pattern | order | perplexity | seconds | × FLOP bound | × plain forward | peak MB |"
    sep = "|---|---|---|---:|---:|---:|---:|---:|"
    if has_llmc:
        head += " llm-compressor perplexity | llm-compressor seconds | llm-compressor peak MB | time ratio | memory ratio |"
        sep += "---:|---:|---:|---:|---:|"
    lines = [f"SmolLM2-135M, {r['nsamples']}x{r['seqlen']} calibration tokens, sparsity {r['sparsity']}, "
             f"perplexity on {r['eval_tokens']} tokens of the bundled evaluation text (dense: "
             f"{r['dense_perplexity']:.2f}). fp32 matmul here: {r['matmul_gflops']:.0f} GFLOP/s, so one forward "
             f"over the calibration tokens is {r['bound_seconds']['one_forward']:.1f} s at best (with the Hessian "
             f"products: {r['bound_seconds']['one_forward_plus_hessians']:.1f} s); a plain forward of the blocks "
             f"measured in this run took {r['bound_seconds']['measured_plain_forward']:.1f} s. Order 'layer' "
             "(default) prunes each layer just before it runs, one pass per block; 'block' takes statistics from the "
             "unpruned block and runs it twice. Peak MB is the whole process (load, prune, save) for both tools. "
             "Ratios are prunekit / llm-compressor.", "", head, sep]
    for row in r["rows"]:
        line = (f"| {row['method']} | {row['pattern']} | {row['order']} | {row['perplexity']:.2f} | {row['seconds']:.1f} | "
                f"{row['x_flop_bound']:.2f} | {row['x_plain_forward']:.2f} | {row['peak_rss_mb']:.0f} |")
        if has_llmc:
            line += (f" {row['llmc_perplexity']:.2f} | {row['llmc_seconds']:.1f} | {row['llmc_peak_rss_mb']:.0f} | "
                     f"{row['time_ratio']:.2f} | {row['memory_ratio']:.2f} |" if "llmc_seconds" in row else " | | | | |")
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
