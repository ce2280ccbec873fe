"""The next tier of one-shot weight pruning on real SmolLM2-135M, beside the baselines each
paper claims to beat: RIA and GBLM against Wanda, DSnoT on top of Wanda and SparseGPT, at 50%
unstructured and 2:4, and channel permutation under 2:4. Perplexity on held-out text, seconds and peak memory of each run.

Every run is a fresh ``prunekit prune ... --json`` process (peak RSS per run, from VmHWM), then
``prunekit eval`` on the saved model. Writes benchmarks/results/methods_weights.{json,md}.

    .venv/bin/python benchmarks/methods/weights.py                 # ~15 min on 2 cores
    .venv/bin/python benchmarks/methods/weights.py --patterns 2:4 --eval-tokens 4096
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from llm_oneshot import run_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: (label, prune flags, the baseline its paper claims to beat)
JOBS = [
    ("magnitude", ["--method", "magnitude"], None),
    ("wanda", ["--method", "wanda"], None),
    ("ria", ["--method", "ria"], "wanda"),
    ("gblm", ["--method", "gblm"], "wanda"),
    ("wanda + dsnot", ["--method", "wanda", "--refine", "dsnot"], "wanda"),
    ("sparsegpt", ["--method", "sparsegpt"], None),
    ("sparsegpt + dsnot", ["--method", "sparsegpt", "--refine", "dsnot"], "sparsegpt"),
]
#: N:M with channel permutation (RIA's paper pairs it with its score), beside the same run unpermuted
PERMUTED = [
    ("wanda + permute", ["--method", "wanda", "--permute"], "wanda"),
    ("ria + permute", ["--method", "ria", "--permute"], "ria"),
    ("sparsegpt + permute", ["--method", "sparsegpt", "--permute"], "sparsegpt"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    p.add_argument("--only", nargs="*", default=None, help="labels of JOBS to run (default: all)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--out", default=str(RESULTS / "methods_weights"))
    args = p.parse_args()
    py = sys.executable
    from prunekit.models.loading import resolve

    model_dir = resolve(args.model)
    eval_flags = ["--seqlen", str(args.seqlen), "--max-tokens", str(args.eval_tokens), "--json", "--quiet"]
    jobs = [(label, flags + ["--pattern", pattern], base, pattern) for pattern in args.patterns
            for label, flags, base in JOBS if args.only is None or label in args.only]
    if "unstructured" in args.patterns and (args.only is None or "gblm + owl" in args.only):
        jobs.append(("gblm + owl", ["--method", "gblm", "--allocation", "owl"], "wanda", "unstructured"))
    for label, flags, base in PERMUTED:  # channel permutation exists for N:M only
        jobs += [(label, flags + ["--pattern", pattern], base, pattern) for pattern in args.patterns
                 if pattern != "unstructured" and (args.only is None or label in args.only)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prunekit-methods-") as tmp:
        dense = run_json([py, "-m", "prunekit.cli", "eval", model_dir, *eval_flags])
        for label, flags, base, pattern in jobs:
            out = os.path.join(tmp, f"{label}-{pattern}".replace(" ", "").replace(":", "of").replace("+", "_"))
            r = run_json([py, "-m", "prunekit.cli", "prune", model_dir, *flags, "--nsamples", str(args.nsamples),
                          "--seqlen", str(args.seqlen), "--output", out, "--json", "--quiet"])
            e = run_json([py, "-m", "prunekit.cli", "eval", out, *eval_flags])
            rows.append({"method": label, "pattern": pattern, "baseline": base, "perplexity": e["perplexity"],
                         "sparsity": r["sparsity"], "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for row in rows:  # the gain over the baseline of the same pattern, computed from this run
        base = next((b for b in rows if b["method"] == row["baseline"] and b["pattern"] == row["pattern"]), None)
        if base is not None:
            row["vs_baseline"] = row["perplexity"] / base["perplexity"] - 1
            row["verdict"] = "beats" if row["perplexity"] < base["perplexity"] else "does not beat"
    result = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "dense_perplexity": dense["perplexity"], "eval_tokens": dense["tokens"], "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(result) + "\n")
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lines = [f"SmolLM2-135M, {r['nsamples']}x{r['seqlen']} calibration tokens, perplexity on {r['eval_tokens']} "
             f"held-out tokens (dense {r['dense_perplexity']:.2f}). The verdict compares each method with the "
             "baseline its paper claims to beat, same pattern, same run.", "",
             "| method | pattern | perplexity | baseline | vs baseline | seconds | peak MB |",
             "|---|---|---:|---|---|---:|---:|"]
    for row in r["rows"]:
        vs = f"{row['verdict']} ({row['vs_baseline']:+.1%})" if "verdict" in row else ""
        lines.append(f"| {row['method']} | {row['pattern']} | {row['perplexity']:.2f} | {row['baseline'] or ''} | "
                     f"{vs} | {row['seconds']:.1f} | {row['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
