"""The same DARE-TIES merge through prunekit and through mergekit, when mergekit is installed.

mergekit needs its own environment here (its dependencies would move prunekit's pins):
``python3 -m venv /tmp/mkv && /tmp/mkv/bin/pip install torch==2.13.0 && /tmp/mkv/bin/pip
install -c constraints.txt mergekit`` with transformers pinned to prunekit's. Give that
interpreter with ``--mergekit-python``. Both merges use every tensor (mergekit sparsifies all
of them, so prunekit runs with ``--include .``), density 0.5 (drop 0.5), weights 1 and 1,
normalised, in float32; each runs in a fresh process and reports its peak RSS. Their random
masks differ (each tool draws its own), so the comparison is of quality (perplexity on both
tasks, from ``run.py``'s fine-tunes), of how far apart the merged weights are, and of memory
and time. Appends ``mergekit`` to ``benchmarks/results/delta.json`` and its table to
``delta.md``. Run after ``run.py``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RESULTS, Scorer, cache_root, resolve, run_cli, splits, state_dict, task_texts  # noqa: E402

MERGEKIT = """
import sys, time
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
import yaml
t0 = time.perf_counter()
run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1]))), sys.argv[2],
          options=MergeOptions(copy_tokenizer=True, lazy_unpickle=True, low_cpu_memory=True))
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(int(hwm) / 1024, time.perf_counter() - t0)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-python", default="/tmp/mkv/bin/python")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--density", type=float, default=0.5)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    base = resolve("default")
    fts = [cache_root() / "bench-delta" / f"ft-{n}-{args.steps}" for n in ("bible", "pydocs")]
    out = json.loads((RESULTS / "delta.json").read_text())
    seqlen, val, test = out["args"]["seqlen"], out["args"]["val_tokens"], out["args"]["test_tokens"]
    tok = AutoTokenizer.from_pretrained(base)
    data = {n: splits(tok, t, seqlen, val, test)["test"] for n, t in task_texts().items()}
    with tempfile.TemporaryDirectory(dir=cache_root() / "bench-delta") as work:
        work = Path(work)
        config = {"merge_method": "dare_ties", "base_model": base, "dtype": "float32",
                  "parameters": {"normalize": True},
                  "models": [{"model": str(f), "parameters": {"weight": 1.0, "density": args.density}} for f in fts]}
        (work / "mk.yaml").write_text(json.dumps(config))
        done = subprocess.run([args.mergekit_python, "-c", MERGEKIT, str(work / "mk.yaml"), str(work / "mk")],
                              capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"mergekit failed: {done.stderr[-3000:]}")
        mk_peak, mk_seconds = (float(v) for v in done.stdout.strip().splitlines()[-1].split())
        pk = run_cli(["merge", base, *map(str, fts), "--method", "dare_ties", "--drop", str(1 - args.density),
                      "--include", ".", "--output", str(work / "pk")])
        score = Scorer(base, seqlen)
        mk_sd, pk_sd, base_sd = state_dict(str(work / "mk")), state_dict(str(work / "pk")), state_dict(base)
        num = sum(float((mk_sd[k].double() - pk_sd[k].double()).square().sum()) for k in pk_sd)
        den = sum(float((pk_sd[k].double() - base_sd[k].double()).square().sum()) for k in pk_sd)
        result = {"date": time.strftime("%Y-%m-%d"), "density": args.density,
                  "mergekit": {"peak_mb": mk_peak, "seconds": mk_seconds,
                               **{t: score(mk_sd, ids) for t, ids in data.items()}},
                  "prunekit": {"peak_mb": pk["peak_memory_mb"], "seconds": pk["seconds"],
                               **{t: score(pk_sd, ids) for t, ids in data.items()}},
                  "relative_delta_difference": (num / den) ** 0.5}
    out["mergekit"] = result
    (RESULTS / "delta.json").write_text(json.dumps(out, indent=1))
    tasks = list(data)
    lines = ["", f"DARE-TIES merge (density {args.density}, every tensor, weights 1/1, normalised), both tools in "
                 "fresh processes:", "", "| tool | " + " | ".join(tasks) + " | peak MB | seconds |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for tool in ("prunekit", "mergekit"):
        r = result[tool]
        lines.append(f"| {tool} | " + " | ".join(f"{r[t]:.2f}" for t in tasks) + f" | {r['peak_mb']:.0f} | "
                     f"{r['seconds']:.1f} |")
    lines.append(f"\n‖merged_mergekit − merged_prunekit‖ / ‖merged_prunekit − base‖ = "
                 f"{result['relative_delta_difference']:.3f} (different random masks)")
    with open(RESULTS / "delta.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
