"""Expert pruning scores on a small trained MoE: held-out loss after removing 25% and 50% of
the experts of every layer with each registered expert score.

A tiny Mixtral-config causal LM (4 blocks, 8 experts, top-2, hidden 64, byte-level
tokens: vocab 256) is trained here from scratch on the bundled calibration text
(``prunekit/assets/stdlib_docstrings.calib.txt``, random 128-byte windows, AdamW, with
Mixtral's load-balancing loss so that every expert learns something). Every method then
prunes a copy of the trained model through ``prune_structure`` (the path of
``prunekit prune --structure experts``) with the same calibration windows drawn from the
calibration text, and the mean next-byte cross-entropy is measured on the held-out
evaluation text (``stdlib_docstrings.eval.txt``, non-overlapping windows). ``random``
runs over three seeds (mean and spread reported).

    .venv/bin/python benchmarks/methods/experts.py            # ~3 min on 2 CPU threads
    .venv/bin/python benchmarks/methods/experts.py --steps 100 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prunekit.calibration import CalibrationData  # noqa: E402
from prunekit.structural import prune_structure  # noqa: E402
from prunekit.structural.config import StructureConfig  # noqa: E402

ASSETS = ROOT / "prunekit" / "assets"
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ["reap", "easy_ep", "greedy", "frequency", "router_norm"]
RANDOM_SEEDS = [0, 1, 2]
RATIOS = [0.25, 0.5]


def byte_ids(path: Path) -> torch.Tensor:
    return torch.tensor(list(path.read_bytes()), dtype=torch.long)  # (bytes,), vocab 256


def windows(ids: torch.Tensor, n: int, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, ids.numel() - seqlen, (n,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in start.tolist()])  # (n, seqlen)


def build(experts: int, seed: int) -> torch.nn.Module:
    import transformers as tf

    cfg = tf.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                           num_experts_per_tok=2, max_position_embeddings=512, router_aux_loss_coef=0.01,
                           output_router_logits=True, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg)


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int, batch: int, seqlen: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    for _ in range(steps):
        x = windows(ids, batch, seqlen, gen)
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()  # includes the load-balancing loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
    model.eval()
    model.config.output_router_logits = False
    return losses


@torch.no_grad()
def eval_loss(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, n: int) -> float:
    x = ids[: n * seqlen].view(n, seqlen)  # (n, seqlen) non-overlapping windows
    total = 0.0
    for chunk in x.split(32):
        logits = model(input_ids=chunk).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1),
                                                         reduction="sum"))
    return total / (n * (seqlen - 1))


def prune_and_eval(model: torch.nn.Module, method: str, ratio: float, seed: int, calib: CalibrationData,
                   eval_ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    pruned = copy.deepcopy(model)
    start = time.perf_counter()
    r = prune_structure(pruned, StructureConfig("experts", ratio, method, seed=seed), data=calib)
    seconds = time.perf_counter() - start
    return {"method": method, "ratio": ratio, "seed": seed, "loss": eval_loss(pruned, eval_ids, args.seqlen,
                                                                              args.eval_windows),
            "seconds": round(seconds, 3), "removed": [g["removed_indices"] for g in r.report["groups"]]}


def table(dense: float, rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| method | loss, 25% removed | Δ vs dense | loss, 50% removed | Δ vs dense | score time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    by: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["method"], r["ratio"]), []).append(r)
    for method in [*METHODS, "random"]:
        cells, secs = [], []
        for ratio in RATIOS:
            rs = by[(method, ratio)]
            losses = [r["loss"] for r in rs]
            mean = statistics.mean(losses)
            spread = f" ± {statistics.stdev(losses):.3f}" if len(losses) > 1 else ""
            cells += [f"{mean:.4f}{spread}", f"{mean - dense:+.4f}"]
            secs += [r["seconds"] for r in rs]
        name = f"random ({len(RANDOM_SEEDS)} seeds, mean ± sd)" if method == "random" else method
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(secs):.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    train_ids = byte_ids(ASSETS / "stdlib_docstrings.calib.txt")
    eval_ids = byte_ids(ASSETS / "stdlib_docstrings.eval.txt")
    model = build(args.experts, args.seed)
    losses = train(model, train_ids, args.steps, args.batch, args.seqlen, args.seed)
    train_s = time.perf_counter() - t0
    dense = eval_loss(model, eval_ids, args.seqlen, args.eval_windows)
    calib = CalibrationData.from_ids(windows(train_ids, args.calib_windows, args.seqlen,
                                             torch.Generator().manual_seed(args.seed + 1000)), batch_size=8)
    rows = [prune_and_eval(model, m, ratio, args.seed, calib, eval_ids, args) for ratio in RATIOS for m in METHODS]
    rows += [prune_and_eval(model, "random", ratio, s, calib, eval_ids, args) for ratio in RATIOS for s in RANDOM_SEEDS]
    total_s = time.perf_counter() - t0
    setup = {"model": f"Mixtral config, 4 blocks, {args.experts} experts, top-2, hidden 64, intermediate 128, "
                      "byte vocab 256, tied embeddings", "train_steps": args.steps, "batch": args.batch,
             "seqlen": args.seqlen, "calib_windows": args.calib_windows, "eval_tokens": args.eval_windows * args.seqlen,
             "threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
             "train_seconds": round(train_s, 1), "total_seconds": round(total_s, 1),
             "final_train_loss": round(statistics.mean(losses[-20:]), 4),
             "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "methods_experts.json").write_text(json.dumps({"setup": setup, "dense_loss": dense, "rows": rows},
                                                             indent=1) + "\n")
    ranked = {ratio: sorted([*METHODS, "random"], key=lambda m: statistics.mean(
        r["loss"] for r in rows if r["method"] == m and r["ratio"] == ratio)) for ratio in RATIOS}
    md = [f"Expert pruning scores (torch {torch.__version__}, {args.threads} CPU threads; whole run "
          f"{total_s:.0f} s, training {train_s:.0f} s).", "",
          f"Model: {setup['model']}, trained {args.steps} steps (batch {args.batch} x {args.seqlen} bytes) on "
          f"the bundled calibration text (last-20-step train loss {setup['final_train_loss']:.3f}, incl. the "
          f"load-balancing term). Scores use {args.calib_windows} x {args.seqlen} calibration bytes from the same "
          f"text; loss: mean next-byte cross-entropy (nats) on {setup['eval_tokens']} held-out bytes of the "
          f"evaluation text. Dense loss: **{dense:.4f}**.", "",
          *table(dense, rows), "",
          "Ordering by mean loss (best first): " + "; ".join(
              f"{int(ratio * 100)}%: " + " < ".join(ranked[ratio]) for ratio in RATIOS) + ".", "",
          "Score time includes the calibration pass (and, for greedy, every layer forward of the search). "
          f"1-minute load average of the shared machine: {setup['load_average'][0]} at the start, "
          f"{setup['load_average'][1]} at the end (times are inflated when it exceeds the thread count)."]
    (RESULTS / "methods_experts.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
