"""The short before → after table a run ends with, and the "requested → achieved" line of
every stage (pure formatting of the report; no torch)."""
from __future__ import annotations

from typing import Any


def human(x: float | int | None, unit: str = "") -> str:
    """134515008 -> '134.52M'; None -> 'n/a'."""
    if x is None:
        return "n/a"
    for suffix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f}{suffix}{unit}"
    return f"{x:g}{unit}" if isinstance(x, float) else f"{x}{unit}"


def _ppl(x: float | None) -> str:
    return "n/a (NaN/Inf)" if x is None else f"{x:,.2f}"


def achieved_line(stage: dict[str, Any]) -> str:
    """What a stage was asked for beside what it did, e.g. ``heads: requested ratio 0.25 ->
    removed 1 of 3 in each of 30 groups (33.3%)``."""
    kind = stage.get("kind")
    if kind == "structure":
        groups = stage.get("groups", [])
        pairs = {(g["units_before"], g["removed"]) for g in groups}
        if len(pairs) == 1 and len(groups) > 1:
            (n, k), = pairs
            how = f"{k} of {n} in each of {len(groups)} groups"
        else:
            how = f"{stage.get('units_removed', 0):,} of {stage.get('units_before', 0):,} units"
        return (f"{stage['structure']} ({stage['method']}): requested ratio {stage['ratio']} -> removed {how} "
                f"({stage.get('ratio_achieved', 0):.1%}); counts round half up per group")
    if kind == "budget":
        chosen = ", ".join(f"{k} {v}" for k, v in stage["chosen"].items() if k != "mix")
        target = next((f"{k[7:]} {stage[k]:,}" for k in ("target_params", "target_macs", "target_latency_ms")
                       if stage.get(k) is not None), "?")
        return (f"budget ({stage['method']}): target {target} -> {stage['metric']} {stage[stage['metric'] + '_after']:,}"
                f"; removed per group: {chosen} (best of {len(stage['candidates'])} candidates by held-out loss)")
    if kind == "weights":
        return (f"weights ({stage['method']}, {stage['pattern']}, {stage['allocation']}): requested sparsity "
                f"{stage['target_sparsity']} -> {stage['sparsity']:.2%} of the pruned layers")
    if kind == "training":
        return f"training: requested sparsity {stage['target_sparsity']} -> {stage['sparsity']:.2%}"
    if kind == "tokens":
        line = (f"tokens ({stage['method']}): MACs of the layers x{stage['macs_ratio']:.2f}, prefill "
                f"{stage['dense_latency_ms']:.1f} -> {stage['latency_ms']:.1f} ms on the first calibration window")
        if stage.get("continuation_perplexity") is not None:
            line += (f"; continuation perplexity {stage['uncut_continuation_perplexity']:.2f} uncut -> "
                     f"{stage['continuation_perplexity']:.2f} cut")
        elif stage.get("embedding_cosine") is not None:
            line += f"; embedding cosine to uncut {stage['embedding_cosine']:.3f}"
        return line
    if kind == "recovery":
        return (f"recovery ({stage['method']}): {stage['steps']} steps, loss {stage['loss_first']:.3f} -> "
                f"{stage['loss_last']:.3f}, masks kept")
    return str(kind)


def summary_table(out: dict[str, Any], report: dict[str, Any]) -> str:
    """Parameters (total, in the pruned layers, nonzero), sparsity and what it is measured
    over, MACs, perplexity before -> after, seconds, peak memory, output path."""
    dense = out.get("dense", {})
    stages = report.get("stages", [])
    macs_before = dense.get("macs")
    reshaped = any(s.get("kind") in ("structure", "budget") for s in stages)
    macs_after = next((s["macs_after"] for s in reversed(stages) if s.get("macs_after") is not None),
                      None if reshaped else macs_before)  # sparse weights keep every shape
    rows = [("", "before", "after", "")]

    def ratio(a: Any, b: Any) -> str:
        return f"{b / a:.3f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else ""

    total_b, total_a = dense.get("params_total"), report.get("params_total")
    rows.append(("parameters", human(total_b), human(total_a), ratio(total_b, total_a)))
    rows.append(("  in pruned layers", human(dense.get("pruned_layers_params")), human(out.get("pruned_layers_params")),
                 ""))
    rows.append(("  nonzero", human(dense.get("params_nonzero")), human(report.get("params_nonzero")),
                 ratio(dense.get("params_nonzero"), report.get("params_nonzero"))))
    rows.append(("sparsity", f"{dense.get('sparsity', 0):.2%}", f"{report.get('sparsity', 0):.2%}",
                 "of the " + str(out.get("sparsity_of", "prunable weights"))))
    if macs_before is not None and macs_after is not None:
        rows.append(("MACs (1x64 tokens)", human(macs_before), human(macs_after),
                     ratio(macs_before, macs_after) if reshaped else "dense kernels; sparse weights keep the shapes"))
    else:
        rows.append(("MACs", "n/a", "n/a", "not counted (an op the tracer has no rule for; see the log)"))
    if "perplexity" in out:
        cached = " (dense: cached)" if out.get("dense_eval_cached") else ""
        rows.append(("perplexity", _ppl(out.get("perplexity_before")), _ppl(out.get("perplexity")),
                     f"{out.get('tokens', 0):,} tokens{cached}"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{width[0]}}  {b:>{width[1]}}  {c:>{width[2]}}  {d}".rstrip() for a, b, c, d in rows]
    lines += [f"stage {s.get('stage', i + 1)}: {achieved_line(s)}" for i, s in enumerate(stages)]
    lines.append(f"seconds: pruning {out.get('prune_seconds', 0):.1f}, total {out.get('total_seconds', 0):.1f};"
                 f" peak memory {out.get('peak_rss_mb', 0):,.0f} MB")
    lines.append(f"output: {out.get('output')}")
    return "\n".join(lines)
