"""What 2:4 sparsity buys on a GPU with sparse tensor cores (CUDA, compute capability >= 8.0).

SmolLM2-135M (``prunekit.load('default')``) in bfloat16, pruned to 2:4 (Wanda by default), timed
three ways, interleaved round by round (medians): the dense model, the 2:4 model run dense (zeros
stored as zeros) and the 2:4 model with its Linear layers swapped for PyTorch's semi-structured
kernels (:func:`prunekit.export.kernels.accelerate_24`): prefill latency of batch 8 x 512 tokens
and greedy decode tokens/s with the KV cache at batch 1 and 8. Then one large matmul alone: an
8192 x 8192 bf16 weight, dense and 2:4 compressed, over 16 to 4096 tokens. Writes
benchmarks/results/payoff_gpu_24.{json,md}. On a machine without the kernels it exits with why.

    .venv/bin/python benchmarks/payoff/gpu_24.py            # ~2-3 min on an H200
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def cuda_ms(fn, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` CUDA-event-timed calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_rows(size: int, tokens: list[int], iters: int) -> list[dict[str, Any]]:
    """A (size, size) bf16 weight with a random 2:4 mask, dense and compressed, over each token count."""
    from torch import nn

    from prunekit.export.kernels import accelerate_24

    g = torch.Generator(device="cuda").manual_seed(0)
    lin = nn.Linear(size, size, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        keep = torch.rand(size, size // 4, 4, device="cuda", generator=g).argsort(dim=2) < 2  # two of every four
        lin.weight.mul_(keep.reshape(size, size))
    fast = nn.Sequential(copy.deepcopy(lin))
    accelerate_24(fast)
    rows = []
    for n in tokens:
        x = torch.randn(n, size, device="cuda", dtype=torch.bfloat16, generator=g)
        with torch.inference_mode():
            dense_ms, sparse_ms = cuda_ms(lambda: lin(x), iters), cuda_ms(lambda: fast(x), iters)
            err = rel_error(fast(x), lin(x))
        flops = 2 * n * size * size  # of the dense product
        rows.append({"tokens": n, "dense_ms": dense_ms, "kernel_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                     "dense_tflops": flops / dense_ms / 1e9, "rel_error": err})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def model_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import prunekit
    from prunekit.calibration.text import calibration_windows, load_text, tokenize
    from prunekit.evaluate.bench import decode_tokens_per_s, prefill_ms, prompt_ids
    from prunekit.export.kernels import accelerate_24

    dense, tok = prunekit.load(args.model, device="cuda", dtype="bfloat16")
    calib = calibration_windows(tokenize(tok, load_text("default", "calib")), args.nsamples, 512, 0)
    pruned = copy.deepcopy(dense)
    t = time.perf_counter()
    prunekit.prune(pruned, {"method": args.method, "sparsity": 0.5, "pattern": "2:4"}, calib, tokenizer=tok,
                   progress=False, device="cuda")
    prune_s = time.perf_counter() - t
    fast = copy.deepcopy(pruned)
    report = accelerate_24(fast)
    models = {"dense": dense, f"2:4 {args.method} (dense)": pruned, f"2:4 {args.method} (kernels)": fast}
    vocab = dense.get_input_embeddings().weight.shape[0]
    prefill_ids = prompt_ids(tok, vocab, args.prompt, args.prefill_batch, torch.device("cuda"))
    decode_ids = {b: prompt_ids(tok, vocab, args.prompt, b, torch.device("cuda")) for b in args.decode_batch}
    with torch.inference_mode():
        logits = {k: m(prefill_ids[:1]).logits for k, m in models.items()}
    prefill = {k: [] for k in models}
    decode = {k: {b: [] for b in args.decode_batch} for k in models}
    for m in models.values():  # warm-up: kernels' first calls, cuBLAS heuristics, the allocator
        prefill_ms(m, prefill_ids)
        decode_tokens_per_s(m, decode_ids[args.decode_batch[0]], 4)
    for _ in range(args.repeats):
        for k, m in models.items():
            prefill[k].append(prefill_ms(m, prefill_ids))
            for b in args.decode_batch:
                decode[k][b].append(decode_tokens_per_s(m, decode_ids[b], args.decode))
    rows = []
    for k in models:
        rows.append({"model": k, "prefill_ms": statistics.median(prefill[k]),
                     "decode_tokens_per_s": {str(b): statistics.median(v) for b, v in decode[k].items()},
                     "logits_rel_error_vs_24_dense": rel_error(logits[k], logits[f"2:4 {args.method} (dense)"])})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    info = {"prune_seconds": prune_s, "converted": len(report["converted"]), "skipped": report["skipped"],
            "backend": report["backend"], "max_rel_error": report["max_rel_error"]}
    return rows, info


def markdown(r: dict[str, Any]) -> str:
    base = r["models"][0]
    batches = list(base["decode_tokens_per_s"])
    lines = [f"2:4 semi-structured kernels on {r['gpu']} (torch {r['torch']}, {r['backend']} backend): "
             f"{r['model']} in bfloat16, 2:4 by {r['method']}, {r['converted']} Linear layers converted "
             f"(others dense: {', '.join(sorted(r['skipped'])) or 'none'}). Prefill: batch {r['prefill_batch']} x "
             f"{r['prompt']} tokens; decode: {r['decode']} greedy steps with the KV cache after a {r['prompt']}-token "
             f"prompt; medians of {r['repeats']} interleaved rounds; ratios against dense.", "",
             "| model | prefill ms | " + " | ".join(f"decode tok/s b{b}" for b in batches) + " | logits rel. err vs 2:4 dense |",
             "|---|---:|" + "---:|" * len(batches) + "---:|"]
    for m in r["models"]:
        tps = m["decode_tokens_per_s"]
        dec = [f"{tps[b]:.0f} ({tps[b] / base['decode_tokens_per_s'][b]:.2f}×)" for b in batches]
        lines.append(f"| {m['model']} | {m['prefill_ms']:.2f} ({m['prefill_ms'] / base['prefill_ms']:.2f}×) | "
                     + " | ".join(dec) + f" | {m['logits_rel_error_vs_24_dense']:.1e} |")
    lines += ["", f"One {r['matmul_size']} x {r['matmul_size']} bf16 weight with a random 2:4 mask (`nn.Linear`):", "",
              "| tokens | dense ms | 2:4 kernel ms | speed-up | dense TFLOP/s | rel. err |",
              "|---:|---:|---:|---:|---:|---:|"]
    for m in r["matmul"]:
        lines.append(f"| {m['tokens']} | {m['dense_ms']:.3f} | {m['kernel_ms']:.3f} | {m['speedup']:.2f}× | "
                     f"{m['dense_tflops']:.0f} | {m['rel_error']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="model spec (default: SmolLM2-135M)")
    p.add_argument("--method", default="wanda", choices=["wanda", "magnitude"])
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows of 512 tokens (default 16)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--decode", type=int, default=64, help="decode steps timed (default 64)")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--matmul-tokens", type=int, nargs="+", default=[16, 512, 4096])
    p.add_argument("--out", default=str(RESULTS / "payoff_gpu_24"))
    args = p.parse_args()
    from prunekit.export.kernels import backend_name, semi_structured_support

    ok, why = semi_structured_support("cuda")
    if not ok:
        sys.exit(f"gpu_24.py measures 2:4 kernels on a CUDA GPU of compute capability >= 8.0; not here: {why}")
    t0 = time.perf_counter()
    rows, info = model_rows(args)
    result = {"model": args.model, "method": args.method, "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__,
              "prompt": args.prompt, "prefill_batch": args.prefill_batch, "decode": args.decode,
              "repeats": args.repeats, "backend": backend_name(), **info, "models": rows,
              "matmul_size": args.matmul_size, "matmul": matmul_rows(args.matmul_size, args.matmul_tokens, 50)}
    result["wall_seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
