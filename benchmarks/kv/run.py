"""KV-cache policies on real SmolLM2-135M: perplexity of a continuation and memory vs the cache budget.

Text: the bundled stdlib docstrings (``prunekit/assets/stdlib_docstrings.eval.txt`` then
``.calib.txt``), concatenated. Per run, the first ``--tokens - --continuation`` tokens are the
prompt, prefilled in one forward (full attention, as every policy prefills); the cache policy then
compresses, and the last ``--continuation`` tokens are fed one at a time (teacher forcing), each
scored on the token after it: perplexity = exp(mean NLL over the continuation). Policies:

- ``streaming`` (4 sinks + recent), ``h2o`` (recent window = half the budget, as the paper's
  balanced split), ``snapkv`` (observation 32, average pooling over 5; the budget bounds the prompt and
  the continuation is appended), each at every ``--budgets`` token count;
- ``magnitude`` at every ``--sparsities`` (no dense window): it keeps every token, so its dense
  bytes equal the full cache; the bytes a bitmap sparse format would take are an estimate.

Attention kernel: ``h2o`` and ``snapkv`` read attention probabilities, so they run eager; the
others run SDPA (4x faster prefill on a CPU). The unpruned reference runs under both, and each
policy's Δ is against the reference of its own kernel.

Memory per run: the KV cache's own peak (keys + values held at once, measured on the tensors) and
the whole process's peak RSS during prefill and during decoding (``/proc/self/clear_refs`` resets
the high-water mark between phases; Linux only), plus ``torch.cuda.max_memory_allocated`` on a GPU.
Eager prefill peaks are dominated by the attention probabilities.

Retrieval: "The secret code is 7421." then ``--retrieval-tokens`` of the text, then "The secret
code is": greedy completion per policy and budget, and the share of (layer, head) caches that still
hold the digits.

Run: ``.venv/bin/python benchmarks/kv/run.py``. At the defaults, about 20-25 min on one CPU core
and less on two (estimated from single runs measured on one core: a 3840-token prefill takes 23 s
under SDPA and 85 s eager, a decoding step 0.05-0.15 s).
Writes ``benchmarks/results/kv.{json,md,png}`` (``--out`` elsewhere).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import prunekit  # noqa: E402
import prunekit.kv as kv  # noqa: E402
from prunekit.calibration.text import ASSETS  # noqa: E402

log = logging.getLogger("benchmarks.kv")
MIB = 2 ** 20


def text_ids(tokenizer, n: int) -> torch.Tensor:
    text = "\n\n".join((ASSETS / f"stdlib_docstrings.{part}.txt").read_text() for part in ("eval", "calib"))
    ids = tokenizer(text[: 12 * n], add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < n:
        sys.exit(f"the asset text has {ids.numel()} tokens, fewer than --tokens {n}")
    return ids[:n]


def _rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _rss_peak_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _gpu_peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / MIB if torch.cuda.is_available() else None


def make_cache(model, policy: str, setting: float | int | None):
    from transformers import DynamicCache

    if policy == "full":
        return DynamicCache()
    if policy == "magnitude":
        return kv.cache(model, "magnitude", sparsity=float(setting))
    if policy == "h2o":
        return kv.cache(model, "h2o", budget=int(setting), window=int(setting) // 2)
    if policy == "snapkv":
        return kv.cache(model, "snapkv", budget=int(setting), observation=min(32, int(setting)))
    return kv.cache(model, policy, budget=int(setting))


@torch.no_grad()
def continuation_ppl(model, ids: torch.Tensor, continuation: int, policy: str, setting: Any) -> dict[str, Any]:
    """Prefill ``ids[:-continuation]``, then feed the continuation one token at a time."""
    device = next(model.parameters()).device
    ids = ids.to(device).unsqueeze(0)
    prompt, cont = ids[:, :-continuation], ids[0, -continuation:]
    cache = make_cache(model, policy, setting)
    t0 = time.perf_counter()
    _rss_reset()
    logits = model(prompt, cache=cache, logits_to_keep=1).logits[:, -1]
    prefill = {"rss_mb": _rss_peak_mb(), "gpu_mb": _gpu_peak_mb(), "seconds": time.perf_counter() - t0}
    _rss_reset()
    t1 = time.perf_counter()
    nll = 0.0
    for j in range(continuation):
        nll += F.cross_entropy(logits.float(), cont[j: j + 1]).item()
        if j + 1 < continuation:
            logits = model(cont[j: j + 1].unsqueeze(0), cache=cache).logits[:, -1]
    decode = {"rss_mb": _rss_peak_mb(), "gpu_mb": _gpu_peak_mb(), "seconds": time.perf_counter() - t1}
    row: dict[str, Any] = {"policy": policy, "setting": setting, "attention": model.config._attn_implementation,
                           "ppl": math.exp(nll / continuation),
                           "prefill": prefill, "decode": decode}
    if policy != "full":
        row["report"] = cache.report().as_dict()
        cache.close()
    return row


@torch.no_grad()
def retrieval(model, tokenizer, filler: torch.Tensor, policy: str, setting: Any) -> dict[str, Any]:
    head = tokenizer("The secret code is 7421. Remember it.\n\n", add_special_tokens=False).input_ids
    tail = tokenizer("\n\nThe secret code is", add_special_tokens=False).input_ids
    want = tokenizer(" 7421", add_special_tokens=False).input_ids
    digits = [i for i in range(len(head) - len(want) + 1) if head[i: i + len(want)] == want]
    ids = torch.tensor([head + filler.tolist() + tail], device=next(model.parameters()).device)
    cache = make_cache(model, policy, setting)
    out = model.generate(ids, max_new_tokens=len(want) + 2, do_sample=False, cache=cache, pad_token_id=0)
    answer = tokenizer.decode(out[0, ids.shape[1]:])
    row = {"policy": policy, "setting": setting, "answer": answer, "retrieved": "7421" in answer.replace(" ", "")}
    if policy not in ("full", "magnitude") and digits:
        span = torch.arange(digits[0] + 1, digits[0] + len(want), device=ids.device)  # the digit tokens
        held = [(cache.positions(i)[0].unsqueeze(-1) == span).any(-2) for i in range(len(cache.layers))]  # (H, k)
        row["digits_held"] = torch.stack(held).float().mean().item()
    if policy != "full":
        cache.close()
    return row


def runs(args: argparse.Namespace) -> list[tuple[str, Any, str]]:
    """(policy, budget or sparsity, attention kernel) of every run: the unpruned reference under
    both kernels, each policy under the cheapest kernel that gives it what it needs."""
    out: list[tuple[str, Any, str]] = [("full", None, "sdpa"), ("full", None, "eager")]
    for policy in args.policies:
        impl = "eager" if kv.KV_POLICIES.get(policy).needs_attention else "sdpa"
        settings = args.sparsities if policy == "magnitude" else args.budgets
        out += [(policy, s, impl) for s in settings]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="prompt + continuation tokens per run")
    ap.add_argument("--continuation", type=int, default=256, help="tokens scored after the prompt")
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512, 1024], help="tokens kept per layer")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="magnitude: zeroed share")
    ap.add_argument("--policies", nargs="+", default=["streaming", "h2o", "snapkv", "magnitude"])
    ap.add_argument("--retrieval-tokens", type=int, default=1536, help="filler between the fact and the question")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if not 0 < args.continuation < args.tokens:
        sys.exit("--continuation must lie between 0 and --tokens")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    loaded = prunekit.load("default")
    model, tok = loaded.model.to(args.device).eval(), loaded.tokenizer
    ids = text_ids(tok, max(args.tokens, args.retrieval_tokens))
    began = time.perf_counter()
    rows, facts = [], []
    for policy, setting, impl in runs(args):
        model.set_attn_implementation(impl)
        rows.append(continuation_ppl(model, ids[: args.tokens], args.continuation, policy, setting))
        facts.append(retrieval(model, tok, ids[: args.retrieval_tokens], policy, setting))
        facts[-1]["attention"] = impl
        log.info("%s %s (%s): ppl %.3f, retrieval %r", policy, setting, impl, rows[-1]["ppl"], facts[-1]["answer"])
    out = {"benchmark": "kv", "date": time.strftime("%Y-%m-%d"), "model": "SmolLM2-135M (fp32)",
           "device": args.device, "threads": torch.get_num_threads(), "seconds": time.perf_counter() - began,
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "perplexity": rows, "retrieval": facts}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv.json").write_text(json.dumps(out, indent=1))
    (args.out / "kv.md").write_text(markdown(out))
    plot(out, args.out / "kv.png")
    log.info("wrote %s", args.out / "kv.md")


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def markdown(out: dict) -> str:
    a = out["args"]
    full = {r["attention"]: r["ppl"] for r in out["perplexity"] if r["policy"] == "full"}
    fact = {(f["policy"], f["setting"], f["attention"]): f for f in out["retrieval"]}
    lines = [f"# KV-cache policies, {out['model']} ({out['date']})", "",
             f"{a['tokens'] - a['continuation']} prompt tokens prefilled, then {a['continuation']} continuation tokens "
             f"fed one at a time and scored; {out['device']}, {out['threads']} threads, {out['seconds'] / 60:.1f} min "
             "in all. Budget: entries kept per layer and key/value head (snapkv: of the prompt; the continuation is "
             "appended). Cache MiB: dense keys + values stored at the end / the most held at once; a full cache holds "
             f"{full_bytes(out):.1f} MiB. Peak RSS: the whole process (model weights included).", "",
             "| policy | budget / sparsity | attention | perplexity | Δ vs full | cache MiB end / peak "
             "| sparse MiB (est.) | RSS MiB prefill / decode | prefill + decode s | retrieval (digits held) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["perplexity"]:
        rep = r.get("report")
        f = fact[(r["policy"], r["setting"], r["attention"])]
        held = f" ({f['digits_held']:.0%})" if "digits_held" in f else ""
        cache_mb = "—" if rep is None else f"{rep['kept_bytes'] / MIB:.1f} / {rep['peak_bytes'] / MIB:.1f}"
        sparse = "—" if rep is None or rep.get("sparse_bytes") is None else f"{rep['sparse_bytes'] / MIB:.1f}"
        lines.append(f"| {r['policy']} | {'—' if r['setting'] is None else r['setting']} | {r['attention']} | "
                     f"{r['ppl']:.3f} | {r['ppl'] - full[r['attention']]:+.3f} | {cache_mb} | {sparse} | "
                     f"{_mb(r['prefill']['rss_mb'])} / {_mb(r['decode']['rss_mb'])} | "
                     f"{r['prefill']['seconds']:.0f} + {r['decode']['seconds']:.0f} | "
                     f"{'yes' if f['retrieved'] else 'no'}{held}: {f['answer'].strip()!r} |")
    lines += ["", "Magnitude keeps every token densely here: its dense bytes equal the full cache's and it saves "
                  "nothing until the entries are stored in a sparse format; the sparse column is an estimate for a "
                  "bitmap format (nonzeros + one bit per entry), not a measurement."]
    return "\n".join(lines) + "\n"


def full_bytes(out: dict) -> float:
    reps = [r["report"] for r in out["perplexity"] if r.get("report")]
    return reps[0]["full_bytes"] / MIB if reps else float("nan")


def plot(out: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = out["perplexity"]
    full = next(r for r in rows if r["policy"] == "full" and r["attention"] == "eager")["ppl"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for policy in ("streaming", "h2o", "snapkv"):
        pts = sorted((r["setting"], r["ppl"]) for r in rows if r["policy"] == policy)
        if pts:
            left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
    left.axhline(full, color="k", ls="--", label="full cache (eager)")
    left.set(xscale="log", xlabel="cache budget (tokens per layer and head)", ylabel="continuation perplexity",
             title="token eviction")
    left.legend()
    pts = sorted((r["setting"], r["ppl"]) for r in rows if r["policy"] == "magnitude")
    if pts:
        right.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="C3", label="magnitude")
    right.axhline(full, color="k", ls="--", label="full cache")
    right.set(xlabel="share of each K/V vector zeroed", ylabel="continuation perplexity",
              title="per-token magnitude (no tokens dropped)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
