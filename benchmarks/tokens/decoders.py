"""Prompt-token pruning in a decoder: FastV, DivPrune and the random control cutting the prompts
of real SmolLM2-135M (prunekit.tokens), no fine-tuning.

Text: the held-out stdlib docstrings (``prunekit/assets/stdlib_docstrings.eval.txt``), cut into
``--windows`` windows of ``--prompt`` + ``--continuation`` tokens. Each window's prompt runs as
one prefill with the cut, then its continuation runs through the KV cache the prefill left,
as ``generate`` would run it; the perplexity is that of the continuation tokens (the prompt's
last logits predict the first). The same windows without a cut give the baseline.

Every method cuts after layer 2 (FastV's K = 2): layers 0-1 see the whole prompt, layers 2-29
``keep`` of it, the last prompt token always among them. DivPrune's paper cuts before the first
layer; ``divprune@0`` is that variant. FastV reads attention probabilities, so the model runs
``attn_implementation="eager"`` throughout, baseline included (latencies compare like with like).

Also measured: prefill latency of the first window's prompt with and without the cut
(interleaved medians), MACs of the layers (every Linear plus the two attention matmuls), and
greedy generation of ``--generate`` tokens after the first prompt: at keep 1.0 it must equal
the uncut generation token for token; below, the fraction of tokens that still agree.

``.venv/bin/python benchmarks/tokens/decoders.py`` (about 15 min on one core); ``--quick`` is a
smoke run. Writes ``benchmarks/results/tokens_decoders.{json,md,png}`` (or under
``$PRUNEKIT_BENCH_RESULTS``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prunekit import tokens  # noqa: E402
from prunekit.calibration.text import ASSETS  # noqa: E402
from prunekit.tokens.quality import continuation_nll  # noqa: E402

RESULTS = Path(os.environ.get("PRUNEKIT_BENCH_RESULTS", ROOT / "benchmarks" / "results"))
VARIANTS = (("fastv", 2), ("divprune", 2), ("random", 2), ("divprune", 0))
log = logging.getLogger("benchmarks.tokens.decoders")


def label(method: str, after: int) -> str:
    return method if after == 2 else f"{method}@{after}"


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunekit.models.loading import resolve

    path = resolve("default")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def windows(tokenizer, n: int, length: int) -> torch.Tensor:
    text = (ASSETS / "stdlib_docstrings.eval.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n * length:
        raise SystemExit(f"the eval text has {ids.numel()} tokens, fewer than {n} windows of {length}")
    return ids[: n * length].view(n, length)  # (W, L), consecutive, no overlap


def perplexity(model, rows: torch.Tensor, split: int) -> float:
    nll = count = 0.0
    for row in rows:
        a, b = continuation_nll(model, row[None, :split], row[None, split:])
        nll, count = nll + a, count + b
    return math.exp(nll / count)


def greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                              pad_token_id=0)[0, prompt.shape[1]:]


def bench(model, rows: torch.Tensor, split: int, keeps: list[float], repeats: int, gen_tokens: int) -> dict:
    first = rows[:1, :split]
    dense_ppl = perplexity(model, rows, split)
    dense_gen = greedy(model, first, gen_tokens)
    log.info("uncut: continuation perplexity %.3f", dense_ppl)
    out = []
    for method, after in VARIANTS:
        for keep in keeps:
            with tokens.prune(model, method, keep=keep, after=after) as handle:
                ppl = perplexity(model, rows, split)
                rep = handle.report({"input_ids": first}, repeats=repeats, warmup=1)
                gen = greedy(model, first, gen_tokens)
            row = dict(method=label(method, after), after=after, keep=keep, perplexity=ppl,
                       kept=rep.tokens_in[-1], macs_ratio=rep.macs_ratio, latency_ms=rep.latency_ms,
                       dense_latency_ms=rep.dense_latency_ms, speedup=rep.speedup,
                       generation_agreement=float((gen == dense_gen).float().mean()),
                       generation_identical=bool(torch.equal(gen, dense_gen)))
            log.info("%s keep %.2f: ppl %.3f, %d tokens kept, MACs x%.2f, prefill %.0f -> %.0f ms, gen agree %.2f",
                     row["method"], keep, ppl, row["kept"], row["macs_ratio"], row["dense_latency_ms"],
                     row["latency_ms"], row["generation_agreement"])
            out.append(row)
    return dict(dense_perplexity=dense_ppl, rows=out)


def markdown(out: dict) -> str:
    r = out["result"]
    lines = ["# Prompt-token pruning in a decoder (SmolLM2-135M)", "",
             f"torch {out['env']['torch']}, {out['env']['threads']} thread(s), {out['env']['machine']}, eager "
             f"attention; {'QUICK SMOKE RUN' if out['quick'] else 'full settings'}. {out['windows']} windows of "
             f"{out['prompt']} prompt + {out['continuation']} continuation tokens of held-out text; cut after 2 "
             "layers (`@0`: before the first); no fine-tuning.", "",
             f"Uncut continuation perplexity: **{r['dense_perplexity']:.3f}**. Latency: the first prompt's prefill, "
             "median of interleaved rounds against the uncut model. Generation: greedy tokens after the first "
             f"prompt agreeing with the uncut model's ({out['generate']} tokens).", "",
             "| keep | kept of " + str(out["prompt"]) + " | MACs | " +
             " | ".join(f"{m} ppl" for m in _methods(r)) + " | " + " | ".join(f"{m} prefill" for m in _methods(r))
             + " | " + " | ".join(f"{m} gen agree" for m in _methods(r)) + " |",
             "|---|---|---|" + "---|" * (3 * len(_methods(r)))]
    for keep in sorted({x["keep"] for x in r["rows"]}, reverse=True):
        by = {x["method"]: x for x in r["rows"] if x["keep"] == keep}
        ref = by[_methods(r)[0]]
        cells = [f"{keep:.2f}", str(ref["kept"]), f"{ref['macs_ratio']:.2f}"]
        cells += [f"{by[m]['perplexity']:.3f}" for m in _methods(r)]
        cells += [f"{by[m]['latency_ms']:.0f} ms ({by[m]['speedup']:.2f}x)" for m in _methods(r)]
        cells += [f"{by[m]['generation_agreement']:.2f}" + (" (=)" if by[m]["generation_identical"] else "")
                  for m in _methods(r)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`(=)`: the generated tokens are identical to the uncut model's. MACs: the cut variants after "
              "layer 2 (the `@0` variant saves more: all 30 layers see the kept tokens)."]
    return "\n".join(lines) + "\n"


def _methods(r: dict) -> list[str]:
    return list(dict.fromkeys(x["method"] for x in r["rows"]))


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = out["result"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in _methods(r):
        rows = sorted((x for x in r["rows"] if x["method"] == m), key=lambda x: x["keep"])
        axes[0].plot([x["keep"] for x in rows], [x["perplexity"] for x in rows], "o-", label=m)
        axes[1].plot([x["keep"] for x in rows], [x["latency_ms"] for x in rows], "o-", label=m)
    axes[0].axhline(r["dense_perplexity"], color="gray", ls="--", label="uncut")
    dense = sorted(x["dense_latency_ms"] for x in r["rows"])
    axes[1].axhline(dense[len(dense) // 2], color="gray", ls="--", label="uncut (median)")
    axes[0].set(xlabel="prompt keep rate", ylabel="continuation perplexity", yscale="log")
    axes[1].set(xlabel="prompt keep rate", ylabel="prefill latency, ms (CPU)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny settings")
    parser.add_argument("--windows", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens per window")
    parser.add_argument("--continuation", type=int, default=None, help="continuation tokens per window")
    parser.add_argument("--generate", type=int, default=32, help="greedy tokens generated after the first prompt")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    n = args.windows or (2 if q else 8)
    prompt = args.prompt or (128 if q else 1024)
    cont = args.continuation or (32 if q else 128)
    keeps = [1.0, 0.5] if q else [1.0, 0.75, 0.5, 0.3, 0.1]
    model, tok = load_smollm2()
    rows = windows(tok, n, prompt + cont)
    result = bench(model, rows, prompt, keeps, 2 if q else 5, 8 if q else args.generate)
    out = dict(quick=q, windows=n, prompt=prompt, continuation=cont, generate=8 if q else args.generate,
               env=dict(torch=torch.__version__, threads=torch.get_num_threads(),
                        machine=platform.processor() or platform.machine()), result=result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tokens_decoders.json").write_text(json.dumps(out, indent=1))
    (RESULTS / "tokens_decoders.md").write_text(markdown(out))
    plot(out, RESULTS / "tokens_decoders.png")
    print(markdown(out))


if __name__ == "__main__":
    main()
