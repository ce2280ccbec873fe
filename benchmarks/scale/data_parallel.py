"""Data-parallel calibration: wall time of one-shot pruning of real SmolLM2-135M with 1 process
against ``torchrun --nproc-per-node N`` (gloo on CPU, NCCL on GPU), same data, same command.

Each run is the real CLI (``prunekit prune default --method M --nsamples S --seqlen T``), one
thread per process (``OMP_NUM_THREADS=1``), so on an ``N``-core machine the ranks do not
compete for cores. Reported: the ``prune_seconds`` each run records (calibration forwards,
statistics, all-gathers and solves; loading and saving excluded), the speed-up, and whether
the pruned weights agree with the single process's (masks identical, largest difference).

``.venv/bin/python benchmarks/scale/data_parallel.py [--ranks 2] [--methods wanda sparsegpt]``
(about 5 min on 2 cores). Writes ``benchmarks/results/data_parallel.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("PRUNEKIT_BENCH_RESULTS", ROOT / "benchmarks" / "results"))
PY = Path(sys.executable)


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prune(method: str, ranks: int, out: Path, nsamples: int, seqlen: int) -> dict:
    args = ["prune", "default", "--method", method, "--sparsity", "0.5", "--nsamples", str(nsamples), "--seqlen",
            str(seqlen), "--batch-size", "4", "--output", str(out), "--quiet", "--json"]
    cmd = [str(PY), "-m", "prunekit", *args] if ranks == 1 else \
        [str(PY.with_name("torchrun")), f"--nproc-per-node={ranks}", f"--master-port={port()}", "-m", "prunekit", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    return json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            one = prune(method, 1, Path(tmp) / f"{method}1", args.nsamples, args.seqlen)
            many = prune(method, args.ranks, Path(tmp) / f"{method}{args.ranks}", args.nsamples, args.seqlen)
            a = load_file(str(Path(tmp) / f"{method}1" / "model.safetensors"))
            b = load_file(str(Path(tmp) / f"{method}{args.ranks}" / "model.safetensors"))
            same_masks = all(torch.equal(a[k] == 0, b[k] == 0) for k in a)
            diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
            rows.append(dict(method=method, one_s=one["prune_seconds"], many_s=many["prune_seconds"],
                             speedup=one["prune_seconds"] / many["prune_seconds"], same_masks=same_masks,
                             max_abs_diff=diff, peak_rss_mb_one=one["peak_rss_mb"],
                             peak_rss_mb_rank0=many["peak_rss_mb"]))
            print(rows[-1], flush=True)
    out = dict(ranks=args.ranks, nsamples=args.nsamples, seqlen=args.seqlen, cpus=os.cpu_count(),
               device="cuda" if torch.cuda.is_available() else "cpu", torch=torch.__version__,
               machine=platform.processor() or platform.machine(), rows=rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_parallel.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Data-parallel calibration, SmolLM2-135M ({out['device']}, {out['cpus']} cores, 1 thread per process)",
             "", f"{args.nsamples} windows of {args.seqlen} tokens, batches of 4, sparsity 0.5; prune_seconds as each "
             "run records it.", "",
             f"| method | 1 process s | {args.ranks} ranks s | speed-up | masks identical | max abs weight diff | "
             "peak RSS MiB (1 / rank 0) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['one_s']:.1f} | {r['many_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{'yes' if r['same_masks'] else 'no'} | {r['max_abs_diff']:.1e} | "
                     f"{r['peak_rss_mb_one']:.0f} / {r['peak_rss_mb_rank0']:.0f} |")
    (RESULTS / "data_parallel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
