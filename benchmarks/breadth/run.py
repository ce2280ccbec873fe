"""Breadth: every causal-LM family the installed transformers ships (tiny random builds) and
a sample of timm vision models, each through every pruning job; JSON + Markdown.

    .venv/bin/python benchmarks/breadth/run.py                 # all LM families, all jobs
    .venv/bin/python benchmarks/breadth/run.py --families llama,mamba --jobs oneshot
    .venv/bin/python benchmarks/breadth/run.py --vision        # the timm sample too

Each job runs in a forked child with a timeout (a hang is an outcome, not the end of the run).
Writes benchmarks/results/breadth.json and breadth.md (or --out DIR).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import prunekit.schedules  # noqa: E402,F401  (imported once here, not in every forked job)
import prunekit.structural  # noqa: E402,F401
from prunekit.evaluate.breadth import JOBS, ONESHOT, STRUCTURES, Outcome, run_isolated  # noqa: E402
from prunekit.models.tiny import causal_lm_types, tiny_causal_lm  # noqa: E402


def lm_example(model_type: str) -> torch.Tensor:
    return torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))


def build_check(model_type: str, timeout: float) -> str:
    """'' if the tiny model builds and runs a forward, else why not."""
    from prunekit.evaluate.breadth import Job

    out = run_isolated(lambda: tiny_causal_lm(model_type), lm_example(model_type), Job("build", "forward", ""),
                       model_type, timeout)
    return "" if out.status == "ok" else f"{out.status}: {out.detail}"


def family_verdict(rows: list[dict]) -> str:
    """``full`` when every one-shot job is ok and every structure is ok or n/a."""
    if any(r["status"] == "skipped" for r in rows):
        return "not built"
    return "full" if all(r["status"] in ("ok", "n/a") for r in rows) else "partial"


def markdown(results: dict[str, list[dict]], seconds: float) -> str:
    jobs = [j.name for j in JOBS]
    lines = ["| model | " + " | ".join(jobs) + " | verdict |", "|---" * (len(jobs) + 2) + "|"]
    for model, rows in results.items():
        by = {r["job"]: r for r in rows}
        cells = []
        for j in jobs:
            r = by.get(j)
            if r is None:
                cells.append("")
                continue
            mark = r["status"] + ("" if r["exact"] is not False else " (inexact)")
            cells.append(mark)
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {family_verdict(rows)} |")
    counts = Counter(family_verdict(rows) for rows in results.values())
    status = Counter(r["status"] for rows in results.values() for r in rows)
    head = [f"# Breadth ({time.strftime('%Y-%m-%d')}, {seconds:.0f} s)", "",
            f"Families: {dict(counts)}; jobs: {dict(status)}", ""]
    return "\n".join(head + lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default="all", help="comma-separated model types, or 'all'")
    p.add_argument("--jobs", default="all", help="all, oneshot, structure, or comma-separated job names")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per job")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="breadth")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    families = causal_lm_types() if args.families == "all" else args.families.split(",")
    jobs = {"all": JOBS, "oneshot": ONESHOT, "structure": STRUCTURES}.get(args.jobs) or \
        [j for j in JOBS if j.name in args.jobs.split(",")]
    results: dict[str, list[dict]] = {}
    start = time.perf_counter()
    for i, family in enumerate(families):
        why = build_check(family, 60.0)
        if why:
            results[family] = [Outcome(family, j.name, "skipped", f"tiny build failed: {why}").to_dict() for j in jobs]
            print(f"[{i + 1}/{len(families)}] {family}: not built ({why[:100]})", flush=True)
            continue
        tiny_causal_lm(family)  # imports the family's modeling code once, before the children fork
        rows = []
        for job in jobs:
            rows.append(run_isolated(lambda t=family: tiny_causal_lm(t), lm_example(family), job, family,
                                     args.timeout).to_dict())
        results[family] = rows
        summary = " ".join(f"{r['job']}={r['status']}" for r in rows if r["status"] != "ok") or "all ok"
        print(f"[{i + 1}/{len(families)}] {family}: {summary}", flush=True)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
               "seconds": round(seconds, 1), "results": results}
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    (args.out / f"{args.name}.md").write_text(markdown(results, seconds))
    print(markdown(results, seconds).splitlines()[2])


if __name__ == "__main__":
    main()
