"""Structured pruning methods on real SmolLM2-135M at one removed-parameter fraction (default 20%),
beside the baselines each paper claims to beat: SliceGPT (PCA rotation of the residual stream)
against plain width pruning and FLAP; FLAP against LLM-Pruner and structured Wanda (Wanda-sp);
LLM-Pruner (block range 4:28) and FLAP, each with and without LoRA recovery. Perplexity on
held-out text, the real parameter count of each result, seconds and peak memory of each run.

The ratio of every job is calibrated first, in one process, with ``prunekit.plan`` (the exact
parameter count of the pruned model, no pruning): a secant search for the ratio whose result
removes the target fraction of the dense model's parameters. This matters for SliceGPT, whose
shortcut matrices (two d x d per block) and untied LM head (the tied 28M embedding is split)
make it keep far more parameters than its slicing ratio says, and for neurons, which leave the
attention and the embedding alone. The table shows the counts each run reports.

Every job is a fresh ``prunekit run RECIPE default --json --quiet`` process (peak RSS per run),
then ``prunekit eval`` on the saved model. LoRA recovery continues the saved pruned model with a
``recovery: {method: lora}`` stage (its seconds and peak memory add to / are the larger of the
pruning run's). Writes benchmarks/results/methods_structure.{json,md}.

    .venv/bin/python benchmarks/methods/structure.py                 # ~20 min on 2 cores
    .venv/bin/python benchmarks/methods/structure.py --only slicegpt width flap --eval-tokens 4096
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from llm_oneshot import run_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: Width kept as a multiple of the 9 attention heads: transformers refuses to save a Llama config
#: whose hidden size is not a multiple of num_attention_heads, so any other width fails at save.
WIDTH_ROUND = 9
#: (label, structure column, structure stages ("ratio": None is calibrated), the rows it is
#: compared with: the baselines its paper claims to beat, or for a variant the row it varies)
JOBS: list[tuple[str, str, list[dict[str, Any]], list[str]]] = [
    ("width", "width", [{"structure": "width", "method": "flap", "round_to": WIDTH_ROUND, "ratio": None}], []),
    ("slicegpt", "width", [{"structure": "width", "method": "slicegpt", "round_to": WIDTH_ROUND, "ratio": None}],
     ["width", "flap"]),
    ("wanda-sp", "neurons", [{"structure": "neurons", "method": "wanda", "ratio": None}], []),
    ("flap", "neurons", [{"structure": "neurons", "method": "flap", "ratio": None}], ["llm_pruner", "wanda-sp"]),
    ("flap heads+neurons", "heads + neurons",
     [{"structure": "heads", "method": "flap", "heads": "kv", "ratio": 0.3333},
      {"structure": "neurons", "method": "flap", "ratio": None}], ["flap"]),
    ("llm_pruner", "neurons, blocks 4:28",
     [{"structure": "neurons", "method": "llm_pruner", "blocks": [4, 28], "ratio": None}], []),
]
#: (label, the job whose saved model it recovers, compared with)
RECOVERED = [
    ("flap + lora", "flap", ["flap", "llm_pruner + lora"]),
    ("llm_pruner + lora", "llm_pruner", ["llm_pruner"]),
]

CALIBRATE = """
import json, sys
import prunekit
from prunekit.api import load
model_dir, target, nsamples, seqlen, tol = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
jobs = json.loads(sys.argv[6])
loaded = load(model_dir)

def removed(stages, r):
    stages = [dict(s, ratio=r) if s["ratio"] is None else s for s in stages]
    p = prunekit.plan({"calibration": {"text": "default", "nsamples": nsamples, "seqlen": seqlen, "seed": 0},
                       "stages": [{"structure": s} for s in stages]}, loaded.model, tokenizer=loaded.tokenizer)
    return 1 - p.params_after / p.params_before, p.params_after

out = {}
for label, stages in jobs.items():
    tried = {}
    def f(r):
        r = round(min(max(r, 0.01), 0.9), 4)
        if r not in tried:
            tried[r] = removed(stages, r)
        return r, tried[r][0]
    a, fa = f(target)
    b, fb = f(2 * target)
    for _ in range(5):  # secant on (ratio, removed fraction); a step of whole units ends it
        if abs(fb - target) <= tol or fb == fa:
            break
        a, fa, (b, fb) = b, fb, f(b + (target - fb) * (b - a) / (fb - fa))
        if b in tried and a == b:
            break
    best = min(tried, key=lambda r: abs(tried[r][0] - target))
    out[label] = {"ratio": best, "planned_removed": tried[best][0], "planned_params_after": tried[best][1],
                  "plans": len(tried)}
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--only", nargs="*", default=None, help="labels of JOBS/RECOVERED to run (default: all); a "
                   "recovered row brings the job it recovers")
    p.add_argument("--target", type=float, default=0.20, help="fraction of the dense parameters removed")
    p.add_argument("--tol", type=float, default=0.002, help="calibration tolerance on the removed fraction")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--lora-steps", type=int, default=40)
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--out", default=str(RESULTS / "methods_structure"))
    args = p.parse_args()
    py = sys.executable
    from prunekit.models.loading import resolve

    t_start = time.perf_counter()
    model_dir = resolve(args.model)
    recovered = [r for r in RECOVERED if args.only is None or r[0] in args.only]
    wanted = {base for _, base, _ in recovered} | set(args.only or [j[0] for j in JOBS])
    jobs = [j for j in JOBS if j[0] in wanted]
    calibration = {"text": "default", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}
    eval_flags = ["--seqlen", str(args.seqlen), "--max-tokens", str(args.eval_tokens), "--json", "--quiet"]

    t = time.perf_counter()
    ratios = run_json([py, "-c", CALIBRATE, model_dir, str(args.target), str(args.nsamples), str(args.seqlen),
                       str(args.tol), json.dumps({label: stages for label, _, stages, _ in jobs})])
    calibration_seconds = time.perf_counter() - t
    print(json.dumps(ratios), file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    saved: dict[str, tuple[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="prunekit-structure-") as tmp:
        dense = run_json([py, "-m", "prunekit.cli", "eval", model_dir, *eval_flags])
        dense_params = dense["params_total"]

        def run_recipe(name: str, stages: list[dict[str, Any]], model: str) -> tuple[str, dict[str, Any]]:
            recipe, out = os.path.join(tmp, name + ".yaml"), os.path.join(tmp, name)
            Path(recipe).write_text(yaml.safe_dump({"calibration": calibration, "stages": stages}, sort_keys=False))
            return out, run_json([py, "-m", "prunekit.cli", "run", recipe, model, "--output", out, "--json", "--quiet"])

        def row(label: str, structure: str, stages: list[dict[str, Any]], r: dict[str, Any], out: str,
                compared: list[str], **extra: Any) -> dict[str, Any]:
            e = run_json([py, "-m", "prunekit.cli", "eval", out, *eval_flags])
            row = {"method": label, "structure": structure, "stages": stages,
                   "ratio": " + ".join(f"{s['structure']['ratio']:g}" for s in stages if "structure" in s),
                   "params_after": r["params_after"], "removed": 1 - r["params_after"] / dense_params,
                   "params_saved": r.get("params_saved", r["params_after"]), "perplexity": e["perplexity"],
                   "baselines": compared, "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"], **extra}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            return row

        for label, structure, stages, compared in jobs:
            stages = [dict(s, ratio=ratios[label]["ratio"]) if s["ratio"] is None else s for s in stages]
            name = label.replace(" ", "_").replace("+", "")
            stages = [{"structure": s} for s in stages]
            out, r = run_recipe(name, stages, model_dir)
            saved[label] = (out, r)
            row(label, structure, stages, r, out, compared, planned_params_after=ratios[label]["planned_params_after"])
        for label, base, compared in recovered:
            base_out, base_r = saved[base]
            stage = {"method": "lora", "steps": args.lora_steps, "lr": args.lora_lr, "rank": args.lora_rank}
            out, r = run_recipe(label.replace(" ", "_").replace("+", ""), [{"recovery": stage}], base_out)
            base_row = next(x for x in rows if x["method"] == base)
            # a recovery-only run's JSON has no stage seconds or losses: its saved report has them
            report = json.loads((Path(out) / "prunekit_report.json").read_text())["stages"][-1]
            # LoRA merges into the same shapes: the parameters are the pruned model's (the reloaded
            # model counts the zero biases as its own, so the run reports params_saved)
            merged = {"params_after": base_r["params_after"], "params_saved": r["params_after"],
                      "seconds": base_r["seconds"] + report["seconds"],
                      "peak_rss_mb": max(base_r["peak_rss_mb"], r["peak_rss_mb"])}
            row(label, base_row["structure"] + " + LoRA", base_row["stages"] + [{"recovery": stage}], merged, out,
                compared, recovery_seconds=report["seconds"], recovery_peak_rss_mb=r["peak_rss_mb"],
                recovery_loss_first=report.get("loss_first"), recovery_loss_last=report.get("loss_last"))
    for row_ in rows:  # each comparison computed from this run's rows
        row_["comparisons"] = []
        for name in row_["baselines"]:
            base = next((b for b in rows if b["method"] == name), None)
            if base is not None:
                row_["comparisons"].append({
                    "baseline": name, "vs_baseline": row_["perplexity"] / base["perplexity"] - 1,
                    "verdict": "beats" if row_["perplexity"] < base["perplexity"] else "does not beat"})
    result = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "target_removed": args.target,
              "dense_perplexity": dense["perplexity"], "dense_params": dense_params, "eval_tokens": dense["tokens"],
              "lora": {"steps": args.lora_steps, "lr": args.lora_lr, "rank": args.lora_rank},
              "calibration": ratios, "calibration_seconds": calibration_seconds,
              "wall_seconds": time.perf_counter() - t_start, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(result) + "\n")
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lora = r["lora"]
    lines = [f"SmolLM2-135M ({r['dense_params'] / 1e6:.1f} M parameters), {r['nsamples']}x{r['seqlen']} calibration "
             f"tokens, perplexity on {r['eval_tokens']} held-out tokens (dense {r['dense_perplexity']:.2f}). Every "
             f"ratio is calibrated (prunekit.plan, {r['calibration_seconds']:.0f} s) so that the result removes "
             f"~{r['target_removed']:.0%} of the dense parameters; 'params after' and 'removed' are what each run "
             "reports (the zero biases a FLAP result's config switch adds for plain from_pretrained are not "
             f"counted; they are in the JSON as params_saved). Width is kept a multiple of {WIDTH_ROUND} (the head "
             "count; transformers cannot save another width), so width rows move in steps of ~1.6-2% of the "
             "parameters. The heads stage removes one of the three key/value groups per block (the smallest step). "
             f"LoRA: masked LoRA rank {lora['rank']}, {lora['steps']} AdamW steps at lr {lora['lr']:g} on the "
             "calibration windows (batches of 4), continuing the saved pruned model; its seconds add the pruning "
             "run's, its peak MB is the larger of the two. 'vs baseline' compares perplexity with each named row "
             f"(the baselines its paper claims to beat, or the row a variant varies), same run. Wall time "
             f"{r['wall_seconds'] / 60:.1f} min.", "",
             "| method | structure | ratio | params after (M) | removed | perplexity | baseline | vs baseline | "
             "seconds | peak MB |",
             "|---|---|---|---:|---:|---:|---|---|---:|---:|"]
    for row in r["rows"]:
        vs = "; ".join(f"{c['verdict']} {c['baseline']} ({c['vs_baseline']:+.1%})" for c in row["comparisons"])
        lines.append(f"| {row['method']} | {row['structure']} | {row['ratio']} | {row['params_after'] / 1e6:.2f} | "
                     f"{row['removed']:.1%} | {row['perplexity']:.2f} | {', '.join(row['baselines'])} | {vs} | "
                     f"{row['seconds']:.1f} | {row['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
