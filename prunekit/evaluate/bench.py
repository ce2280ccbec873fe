"""``prunekit bench``: measured speed and size of a dense model beside its pruned versions.

Per model: parameters (total and nonzero), the weights file and its format, prefill latency
(one forward of ``batch 1 x prompt_tokens``), decode tokens/s at each batch size (greedy steps
with the KV cache after a prefill), and optionally per-block prefill latency. Every timing is
interleaved across the models, round by round (the median over rounds is kept), so a change in
machine load hits all of them alike and the ratios to the first model stay meaningful on a
shared machine. Peak memory is measured per model in a fresh process (``peak_memory=True``):
on the CPU the process's resident high-water mark, on a GPU ``torch.cuda.max_memory_allocated``.

Masks make no layer faster: a pruned model with unstructured or N:M zeros runs dense here. For
its largest sparse layer the bench times the matmul dense and as a CSR sparse tensor on the
same device and says which was faster (``sparse_kernel``, ``kernel``); structure removed is what
shows up in latency. The one exception (``sparse_kernels``, ``auto`` by default): on a CUDA GPU of
compute capability >= 8.0, each pruned model with 2:4 Linear layers is also timed as a copy whose
layers run through PyTorch's semi-structured kernels (:mod:`prunekit.export.kernels`), an extra
row ``'<model> [2:4 kernels]'``; elsewhere the result says why no 2:4 speed-up was measured.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, KernelUnavailableError

KERNEL_SUFFIX = " [2:4 kernels]"
SPARSE_KERNEL_MODES = ("auto", "off", "on")


@dataclass(frozen=True)
class BenchConfig:
    """What is measured: prompt length, decode steps and batch sizes, rounds, per-block timing."""

    prompt_tokens: int = 128
    decode_tokens: int = 32
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 5
    warmup: int = 1
    layers: bool = False
    peak_memory: bool = True
    sparse_kernels: str = "auto"

    def __post_init__(self) -> None:
        if self.sparse_kernels not in SPARSE_KERNEL_MODES:
            raise ConfigError(f"bench sparse-kernels must be one of {list(SPARSE_KERNEL_MODES)}, "
                              f"got {self.sparse_kernels!r}")
        for name in ("prompt_tokens", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"bench {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.batches or min(self.batches) < 1:
            raise ConfigError(f"bench batch sizes must be positive integers, got {list(self.batches)}")
        if self.warmup < 0:
            raise ConfigError(f"bench warmup must be 0 or more, got {self.warmup}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "generate") and hasattr(model, "config") and callable(getattr(model, "can_generate", None)) \
        and model.can_generate()


@torch.inference_mode()
def prefill_ms(model: nn.Module, ids: torch.Tensor) -> float:
    """Milliseconds of one forward over ``ids`` ``(B, T)`` without a cache."""
    device = _device(model)
    _sync(device)
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(device)
    return (time.perf_counter() - t) * 1e3


def _cache_kwarg(model: nn.Module) -> str:
    """The forward's KV-cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def greedy_decode(model: nn.Module, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """Greedy decoding with the KV cache after a prefill of ``ids`` ``(B, T)``: the ``steps + 1``
    tokens ``(B, steps + 1)`` (the first from the prefill) and the seconds of the ``steps``
    one-token forwards (the prefill is not timed)."""
    device, key = _device(model), _cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True)
    cache = lambda o: o.cache if getattr(o, "cache", None) is not None else o.past_key_values  # noqa: E731
    past, nxt = cache(out), out.logits[:, -1:].argmax(-1)  # (B, 1)
    tokens = [nxt]
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, use_cache=True, **{key: past})
        past, nxt = cache(out), out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
    _sync(device)
    return torch.cat(tokens, dim=1), time.perf_counter() - t


def decode_tokens_per_s(model: nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Tokens/s of greedy decoding with the KV cache, batch ``B``: ``B * steps / seconds``."""
    return ids.shape[0] * steps / greedy_decode(model, ids, steps)[1]


@torch.inference_mode()
def block_ms(model: nn.Module, ids: torch.Tensor) -> list[float]:
    """Per-block milliseconds of one prefill forward (hooks around every block)."""
    from ..models.decoder import block_list

    found = block_list(model)
    if found is None:
        return []
    device, starts, times = _device(model), {}, []
    blocks = list(found[1])

    def pre(i: int):
        def hook(*_: Any) -> None:
            _sync(device)
            starts[i] = time.perf_counter()
        return hook

    def post(i: int):
        def hook(*_: Any) -> None:
            _sync(device)
            times.append((i, (time.perf_counter() - starts[i]) * 1e3))
        return hook

    handles = [h for i, b in enumerate(blocks) for h in (b.register_forward_pre_hook(pre(i)),
                                                        b.register_forward_hook(post(i)))]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = [0.0] * len(blocks)
    for i, ms in times:
        out[i] += ms
    return out


def prompt_ids(tokenizer: Any, vocab: int, tokens: int, batch: int, device: torch.device) -> torch.Tensor:
    """``(batch, tokens)`` ids of the bundled evaluation text (random ids in the vocabulary when
    there is no tokenizer), each row a different stretch of the text."""
    if tokenizer is not None:
        from ..calibration.text import load_text, tokenize

        text = tokenize(tokenizer, load_text("default", "eval"))
        need = tokens * batch
        text = text.repeat((need + text.numel() - 1) // text.numel())[:need]
        return text.view(batch, tokens).to(device)
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0)).to(device)


@torch.inference_mode()
def sparse_kernel_probe(model: nn.Module, tokens: int, repeats: int = 5) -> dict[str, Any] | None:
    """For the largest Linear with at least 10% zeros: median milliseconds of its matmul over
    ``tokens`` rows as a dense weight and as a CSR sparse one (``torch.sparse.mm``), on the
    model's device; None when no Linear is sparse."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and float((m.weight == 0).float().mean()) >= 0.1]
    if not found:
        return None
    name, lin = max(found, key=lambda nm: nm[1].weight.numel())
    w = lin.weight  # (out, in)
    x = torch.randn(w.shape[1], tokens, dtype=w.dtype, device=w.device)  # (in, tokens)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            csr = w.to_sparse_csr()
        torch.sparse.mm(csr, x)
    except (RuntimeError, NotImplementedError) as exc:
        return {"layer": name, "sparsity": float((w == 0).float().mean()), "dense_ms": None, "csr_ms": None,
                "faster": False, "note": f"no CSR matmul for {w.dtype} on {w.device}: {str(exc).splitlines()[0]}"}
    times: dict[str, list[float]] = {"dense": [], "csr": []}
    for _ in range(repeats + 1):  # the first round warms up
        for kind, fn in (("dense", lambda: w @ x), ("csr", lambda: torch.sparse.mm(csr, x))):
            _sync(w.device)
            t = time.perf_counter()
            fn()
            _sync(w.device)
            times[kind].append((time.perf_counter() - t) * 1e3)
    dense_ms, csr_ms = statistics.median(times["dense"][1:]), statistics.median(times["csr"][1:])
    return {"layer": name, "sparsity": float((w == 0).float().mean()), "dense_ms": dense_ms, "csr_ms": csr_ms,
            "faster": csr_ms < dense_ms}


def kernel_note(probe: dict[str, Any] | None) -> str:
    """How the pruned layers run in this bench, from :func:`sparse_kernel_probe`."""
    if probe is None:
        return "dense (no sparse weights)"
    if probe.get("dense_ms") is None:
        return f"dense ({probe['note']})"
    verdict = ("CSR is faster for this layer, but this bench runs every layer dense: prunekit has no sparse-kernel "
               "runtime yet" if probe["faster"] else "the sparse kernel is slower here, so dense is the right choice")
    return (f"dense; {probe['layer']} at {probe['sparsity']:.0%} zeros: dense {probe['dense_ms']:.2f} ms, "
            f"CSR {probe['csr_ms']:.2f} ms ({verdict})")


def with_kernel_copies(models: dict[str, tuple[nn.Module, Any, str | None]],
                       mode: str) -> tuple[dict[str, tuple[nn.Module, Any, str | None]], dict[str, Any]]:
    """``models`` with, after each pruned one (all but the first) that has 2:4 Linear layers, a
    copy running them through the semi-structured kernels, where the device has them; and the
    result's ``sparse_kernels`` record. ``on``: an error when none can be timed."""
    import copy

    from ..export.kernels import accelerate_24, classify_24, semi_structured_support

    if mode == "off":
        return models, {"mode": "off"}
    ok, reason = semi_structured_support(_device(next(iter(models.values()))[0]))
    info: dict[str, Any] = {"mode": mode, "available": ok, "reason": reason, "models": {}}
    if not ok:
        if mode == "on":
            raise KernelUnavailableError(f"--sparse-kernels on: 2:4 kernels cannot run: {reason}; they need a CUDA "
                                         "GPU of compute capability >= 8.0 (or pass --sparse-kernels auto/off)")
        info["note"] = f"{reason}; 2:4 kernels need a CUDA GPU of compute capability >= 8.0, so every model ran dense"
        return models, info
    out, why = {}, {}
    for i, (label, (model, tok, path)) in enumerate(models.items()):
        out[label] = (model, tok, path)
        if i == 0:  # the baseline
            continue
        names, skipped = classify_24(model)
        if not names:
            why[label] = next(iter(skipped.values()), "no Linear layers")
            continue
        fast = copy.deepcopy(model)
        try:
            report = accelerate_24(fast)
        except KernelUnavailableError as exc:
            if mode == "on":
                raise
            info["models"][label] = {"error": str(exc)}
            continue
        info["models"][label] = {"label": label + KERNEL_SUFFIX, "converted": len(report["converted"]),
                                 "skipped": len(report["skipped"]), "backend": report["backend"],
                                 "max_rel_error": report["max_rel_error"]}
        out[label + KERNEL_SUFFIX] = (fast, tok, None)
    if not any("label" in v for v in info["models"].values()):
        first = next(iter(why.items()), None)
        note = "no pruned model has Linear layers the 2:4 kernels take"
        note += f" ({first[0]}: {first[1]})" if first else ""
        if mode == "on":
            raise ConfigError(f"--sparse-kernels on: {note}; prune with --pattern 2:4 and bench in float16/bfloat16")
        info["note"] = note
    return out, info


def _kernel_fields(row: dict[str, Any], source: dict[str, Any], record: dict[str, Any]) -> None:
    """A kernel copy's row: the source's parameter counts, ratios to the source, its kernel note."""
    row.update(params_total=source["params_total"], params_nonzero=source["params_nonzero"], kernels_of=source["label"],
               sparse_kernel=None, kernel=f"2:4 {record['backend']} kernels on {record['converted']} Linear layers "
                                         f"(max relative error {record['max_rel_error']:.2g}); the rest dense")
    row["prefill_vs_source"] = row["prefill_ms"] / source["prefill_ms"]
    row["decode_vs_source"] = {b: v / source["decode_tokens_per_s"][b] for b, v in row["decode_tokens_per_s"].items()}


def measure(models: dict[str, tuple[nn.Module, Any, str | None]], config: BenchConfig,
            progress: bool = True) -> dict[str, Any]:
    """Bench ``{label: (model, tokenizer, saved directory or None)}``; the first is the baseline
    the ratios are taken against. Returns the JSON-ready result."""
    from tqdm.auto import tqdm

    from ..export.compact import checkpoint_info
    from ..export.kernels import tensor_bytes
    from .sparsity import count_params

    first = next(iter(models.values()))[0]
    device = _device(first)
    lms = {k: is_causal_lm(m) for k, (m, _, _) in models.items()}
    if not all(lms.values()):
        bad = [k for k, v in lms.items() if not v]
        raise ConfigError(f"bench measures causal language models (prefill and decode with a KV cache); {bad[0]} "
                          "is not one; time other models with prunekit.evaluate.latencies_ms")
    models, kernels = with_kernel_copies(models, config.sparse_kernels)
    sources = {v["label"]: k for k, v in kernels.get("models", {}).items() if "label" in v}
    inputs = {}
    for k, (m, tok, _) in models.items():
        vocab = m.get_input_embeddings().weight.shape[0]
        inputs[k] = {b: prompt_ids(tok, vocab, config.prompt_tokens, b, _device(m)) for b in {1, *config.batches}}
    for k, (m, _, _) in models.items():
        m.eval()
        for _ in range(config.warmup):
            prefill_ms(m, inputs[k][1])
            decode_tokens_per_s(m, inputs[k][min(config.batches)], 2)
    prefill: dict[str, list[float]] = {k: [] for k in models}
    decode: dict[str, dict[int, list[float]]] = {k: {b: [] for b in config.batches} for k in models}
    layers: dict[str, list[list[float]]] = {k: [] for k in models}
    for _ in tqdm(range(config.repeats), desc="bench rounds", disable=not progress, leave=False):
        for k, (m, _, _) in models.items():  # interleaved: every model once per round
            prefill[k].append(prefill_ms(m, inputs[k][1]))
            for b in config.batches:
                decode[k][b].append(decode_tokens_per_s(m, inputs[k][b], config.decode_tokens))
            if config.layers:
                layers[k].append(block_ms(m, inputs[k][1]))
    base = next(iter(models))
    rows: list[dict[str, Any]] = []
    for k, (m, _, path) in models.items():
        total, nonzero = count_params(models[sources.get(k, k)][0])  # a compressed weight has no count_nonzero
        p = statistics.median(prefill[k])
        d = {str(b): statistics.median(v) for b, v in decode[k].items()}
        row: dict[str, Any] = {
            "label": k, "path": path, "params_total": total, "params_nonzero": nonzero,
            "weights_bytes_in_memory": sum(tensor_bytes(t) for t in m.parameters()),
            "prefill_ms": p, "prefill_ms_repeats": prefill[k], "decode_tokens_per_s": d}
        if k in sources:
            _kernel_fields(row, next(r for r in rows if r["label"] == sources[k]), kernels["models"][sources[k]])
        else:
            probe = sparse_kernel_probe(m, config.prompt_tokens)
            row.update(sparse_kernel=probe, kernel=kernel_note(probe))
        if path is not None and Path(path).is_dir():
            row["checkpoint"] = checkpoint_info(path)
        if config.layers:
            row["block_ms"] = [statistics.median(col) for col in zip(*layers[k])] if layers[k] and layers[k][0] else []
        rows.append(row)
    b0 = rows[0]
    for row in rows:
        row["prefill_vs_first"] = row["prefill_ms"] / b0["prefill_ms"]
        row["decode_vs_first"] = {b: row["decode_tokens_per_s"][b] / b0["decode_tokens_per_s"][b]
                                  for b in row["decode_tokens_per_s"]}
    return {"device": str(device), "dtype": str(next(first.parameters()).dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "baseline": base, "prompt_tokens": config.prompt_tokens,
            "decode_tokens": config.decode_tokens, "batches": list(config.batches), "repeats": config.repeats,
            "models": rows, "sparse_kernels": kernels}


PEAK_SCRIPT = """
import json, sys, torch
from prunekit.evaluate.bench import BenchConfig, decode_tokens_per_s, prefill_ms, prompt_ids
from prunekit.evaluate.resources import peak_rss_mb
from prunekit.models.loading import load_model
from prunekit.models.placement import parse_device, parse_dtype, place
spec, device, dtype, cfg = sys.argv[1], sys.argv[2], sys.argv[3], BenchConfig(**json.loads(sys.argv[4]))
model, tok, _ = load_model(spec, parse_dtype(dtype))
dev = place(model, parse_device(device))
if sys.argv[5:] == ["kernels"]:
    from prunekit.export.kernels import accelerate_24
    accelerate_24(model, check=False)
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats(dev)
vocab = model.get_input_embeddings().weight.shape[0]
prefill_ms(model, prompt_ids(tok, vocab, cfg.prompt_tokens, 1, dev))
decode_tokens_per_s(model, prompt_ids(tok, vocab, cfg.prompt_tokens, max(cfg.batches), dev), cfg.decode_tokens)
peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else peak_rss_mb()
print(json.dumps({"peak_memory_mb": peak, "kind": "cuda allocated" if dev.type == "cuda" else "process RSS"}))
"""


def peak_memory(spec: str, device: str, dtype: str, config: BenchConfig, kernels: bool = False) -> dict[str, Any]:
    """Peak memory of loading ``spec`` (with ``kernels``, its 2:4 layers then compressed) and running
    one prefill and the largest batch's decode, in a fresh process (so nothing of this one counts)."""
    cfg = {"prompt_tokens": config.prompt_tokens, "decode_tokens": config.decode_tokens,
           "batches": list(config.batches)}
    argv = [sys.executable, "-c", PEAK_SCRIPT, spec, device, dtype, json.dumps(cfg)] + (["kernels"] if kernels else [])
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"peak_memory_mb": None, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table (ratios against the first model)."""
    batches = result["batches"]
    head = ["model", "params (M)", "nonzero (M)", "weights file (MB)", f"prefill ms (1x{result['prompt_tokens']})",
            *[f"decode tok/s b{b}" for b in batches], "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in result["models"]:
        ck = r.get("checkpoint")
        file_mb = f"{ck['file_bytes'] / 1e6:.1f} ({ck['format']})" if ck else ""
        dec = [f"{r['decode_tokens_per_s'][str(b)]:.1f} ({r['decode_vs_first'][str(b)]:.2f}×)" for b in batches]
        peak = r.get("peak_memory_mb")
        lines.append(f"| {r['label']} | {r['params_total'] / 1e6:.2f} | {r['params_nonzero'] / 1e6:.2f} | {file_mb} | "
                     f"{r['prefill_ms']:.1f} ({r['prefill_vs_first']:.2f}×) | " + " | ".join(dec)
                     + f" | {'' if peak is None else f'{peak:.0f}'} |")
    kernels = result.get("sparse_kernels") or {}
    for label, rec in kernels.get("models", {}).items():
        if "error" in rec:
            lines.append(f"\n2:4 kernels not timed for {label}: {rec['error']}")
    if kernels.get("note"):
        lines.append(f"\nNo 2:4 kernel speed-up was measured: {kernels['note']}.")
    return "\n".join(lines)


__all__ = ["BenchConfig", "block_ms", "decode_tokens_per_s", "greedy_decode", "measure", "peak_memory", "prefill_ms",
           "table", "with_kernel_copies"]
