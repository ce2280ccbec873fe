"""The HTML of ``prunekit report``: one page, its style inline, its charts as data URIs.
Every piece of text that comes from a file passes through :func:`html.escape`."""
from __future__ import annotations

import base64
import datetime as dt
import math
from html import escape
from pathlib import Path
from typing import Any, Iterable, Sequence

from .report import CHARTS, REPORT_FILE, Run

#: float fields that are fractions, shown as percentages
FRACTIONS = {"sparsity", "target_sparsity", "allocated", "ratio", "ratio_requested", "ratio_achieved",
             "ratio_of_params", "density"}
#: the most rows a folded table shows (the rest is counted)
MAX_ROWS = 300
#: a list of numbers up to this long is written out in a cell
SHORT_LIST = 12
#: stage fields drawn as their own section rather than listed
OWN_SECTION = ("layers", "groups", "loss_curve", "candidates")

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d232b;margin:0;background:#f4f5f7}
main{max-width:1120px;margin:0 auto;padding:24px 32px 48px;background:#fff;min-height:100vh;box-sizing:border-box}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #dde1e6;
padding-bottom:4px}h3{font-size:15px;margin:20px 0 8px}
.meta{color:#58616c;margin:0 0 4px}.meta b{color:#1d232b;font-weight:600}
.hint{color:#58616c;background:#f4f6f9;border-left:3px solid #9aa5b1;padding:8px 12px;margin:8px 0}
code,pre{font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre{background:#f4f6f9;border:1px solid #dde1e6;padding:10px 12px;overflow-x:auto;white-space:pre}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #dde1e6;padding:3px 9px;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.chosen td{background:#e3f3e8;font-weight:600}tr.this td{background:#eef4fb}
table.kv th{min-width:150px;font-weight:500;background:#f7f8fa}
details{margin:4px 0 10px}summary{cursor:pointer;color:#2d5f94}
img{max-width:100%;height:auto;display:block;margin:8px 0;border:1px solid #eceff2}
.wrap{overflow-x:auto}
"""


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def number(value: Any, key: str = "") -> str:
    """A value as shown in a cell: integers with thousands separators, fractions as
    percentages, other floats to 4 significant digits (whole from 10,000, one decimal from 1,000)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if key in FRACTIONS or key.endswith("_sparsity"):
            return f"{value:.2%}"
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        return f"{value:,.1f}" if abs(value) >= 1e3 else f"{value:.4g}"
    if value is None:
        return "–"
    return str(value)


def cell(value: Any, key: str = "") -> str:
    """A short, escaped rendering of any JSON value (long lists and dicts are counted, not dumped)."""
    if _is_scalar(value):
        return escape(number(value, key))
    if isinstance(value, (list, dict)) and not value:
        return "–"
    if isinstance(value, list):
        if len(value) <= SHORT_LIST and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return escape(("×" if key == "shape" else ", ").join(number(v) for v in value))
        return f"<i>{len(value):,} items</i>"
    if isinstance(value, dict):
        if len(value) <= 4 and all(_is_scalar(v) for v in value.values()):
            return escape(", ".join(f"{k}: {number(v, str(k))}" for k, v in value.items()))
        return f"<i>{len(value):,} entries</i>"
    return escape(str(value))


def _td(value: Any, key: str = "") -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool) or \
        isinstance(value, str) and value.endswith("×)")  # a number beside its ratio
    return f"<td class=\"n\">{cell(value, key)}</td>" if numeric else f"<td>{cell(value, key)}</td>"


def kv_table(items: Iterable[tuple[str, Any]], pairs: int = 1) -> str:
    """Keys and values, ``pairs`` of them side by side per row."""
    cells = [f"<th>{escape(str(k))}</th>{_td(v, str(k))}" for k, v in items]
    rows = "".join("<tr>" + "".join(cells[i:i + pairs]) + "</tr>" for i in range(0, len(cells), pairs))
    return f"<table class=\"kv\">{rows}</table>" if rows else ""


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, *, first: str | None = None,
          row_class: Any = None) -> str:
    """Rows of dicts as a table with the union of their keys (in order of appearance); ``first``
    names the column holding each row's key; ``row_class(row)`` a CSS class or None."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = []
    for r in rows[:MAX_ROWS]:
        cls = row_class(r) if row_class else None
        attr = f" class=\"{escape(cls)}\"" if cls else ""
        body.append(f"<tr{attr}>" + "".join(_td(r.get(c), str(c)) if c != first else f"<td>{cell(r.get(c))}</td>"
                                             for c in columns) + "</tr>")
    more = f"<p class=\"meta\">… and {len(rows) - MAX_ROWS:,} more rows</p>" if len(rows) > MAX_ROWS else ""
    return f"<div class=\"wrap\"><table><tr>{head}</tr>{''.join(body)}</table></div>{more}"


def folded(title: str, body: str) -> str:
    return f"<details><summary>{escape(title)}</summary>{body}</details>"


def image(drawn: dict[str, bytes], name: str) -> str:
    if name not in drawn:
        return ""
    data = base64.b64encode(drawn[name]).decode("ascii")
    return f"<img alt=\"{escape(CHARTS[name])}\" src=\"data:image/png;base64,{data}\">"


def _hint(text: str) -> str:
    return f"<p class=\"hint\">{text}</p>"


def header(run: Run) -> str:
    from . import __version__

    r, config = run.report, run.config or {}
    model = r.get("model") or config.get("_name_or_path") or run.path.name
    arch = ", ".join(config.get("architectures") or []) or config.get("model_type") or "–"
    made = dt.datetime.fromtimestamp((run.path / REPORT_FILE).stat().st_mtime).astimezone()
    now = dt.datetime.now().astimezone()
    saved_by = f" (result saved by prunekit {r['prunekit_version']})" if r.get("prunekit_version") else ""
    lines = [("model", model), ("architecture", arch), ("result", str(run.path)),
             ("pruned", made.strftime("%Y-%m-%d %H:%M %Z")), ("calibration text", r.get("calib")),
             ("report", f"{now:%Y-%m-%d %H:%M %Z} by prunekit {__version__}" + saved_by)]
    meta = "".join(f"<p class=\"meta\">{escape(k)}: <b>{escape(str(v))}</b></p>" for k, v in lines if v)
    return f"<h1>prunekit report: {escape(run.path.name)}</h1>{meta}"


def _ratio(after: Any, before: Any) -> str:
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (after, before)) and before
    return f"{after / before:.3f}×" if ok else ""


def summary(run: Run) -> str:
    from .export.compact import checkpoint_info

    r, stages = run.report, run.stages
    first, last = (stages[0], stages[-1]) if stages else (r, r)
    rows = [("parameters", first.get("params_before"), r.get("params_total", last.get("params_after"))),
            ("nonzero parameters", first.get("nonzero_before"), r.get("params_nonzero", last.get("nonzero_after")))]
    if first.get("macs_before") is not None or last.get("macs_after") is not None:
        rows.append(("MACs", first.get("macs_before"), last.get("macs_after")))
    if last.get("latency_ms_before") is not None:
        rows.append((f"latency ms ({last.get('latency_tokens', '?')} tokens)", last.get("latency_ms_before"),
                     last.get("latency_ms_after")))
    body = "".join(f"<tr><th>{escape(k)}</th>{_td(b)}{_td(a)}<td class=\"n\">{_ratio(a, b)}</td></tr>"
                   for k, b, a in rows)
    sparsity = r.get("sparsity", last.get("sparsity"))
    body += f"<tr><th>sparsity</th><td class=\"n\">–</td>{_td(sparsity, 'sparsity')}<td></td></tr>"
    ck = checkpoint_info(run.path)
    tensors = ck.get("tensors")
    fmt = ck["format"] + (f" ({', '.join(f'{v} {k}' for k, v in tensors.items())} tensors)" if tensors else "")
    size = f"{ck['file_bytes'] / 2**20:,.2f} MiB ({ck['file_bytes']:,} bytes)" if ck["file_bytes"] else None
    if size is None:
        fmt = "no weights file in the directory"
    extra = [("weights on disk", size),
             ("checkpoint format", fmt), ("stages", " → ".join(str(s.get("kind")) for s in stages) or "–"),
             ("time pruning", f"{sum(float(s.get('seconds') or 0) for s in stages):.3g} s")]
    peaks = [s["peak_rss_mb"] for s in stages if isinstance(s.get("peak_rss_mb"), (int, float))]
    if peaks:
        extra.append(("peak memory", f"{max(peaks):,.0f} MB"))
    note = f"<p class=\"meta\">sparsity: of the {escape(str(r.get('sparsity_of') or last.get('sparsity_of')))}</p>" \
        if r.get("sparsity_of") or last.get("sparsity_of") else ""
    return ("<h2>Summary</h2><table><tr><th></th><th>before</th><th>after</th><th>after/before</th></tr>"
            f"{body}</table>{note}{kv_table(extra)}")


def quality(run: Run) -> str:
    e = run.evaluation
    if e is None:
        return ("<h2>Quality</h2>" + _hint("No <code>prunekit_eval.json</code> in this result. Measure perplexity "
                "before and after by pruning with <code>prunekit prune ... --eval TEXT</code> (for example "
                "<code>--eval default</code>), or evaluate the saved model with <code>prunekit eval "
                f"{escape(str(run.path))}</code>."))
    out = ["<h2>Quality</h2>"]
    before, after = e.get("perplexity_before"), e.get("perplexity")
    if isinstance(after, (int, float)):
        line = f"perplexity <b>{escape(number(after))}</b>"
        if isinstance(before, (int, float)):
            line = f"perplexity {escape(number(before))} → <b>{escape(number(after))}</b> ({_ratio(after, before)})"
        out.append(f"<p>{line}</p>")
    shown = {"perplexity", "perplexity_before"} if isinstance(after, (int, float)) else set()
    out.append(kv_table((k, v) for k, v in e.items() if k not in shown and
                        (_is_scalar(v) or isinstance(v, list) and len(v) <= SHORT_LIST)))
    shots = e.get("zero_shot")
    if isinstance(shots, dict) and shots:
        rows = [{"task": t, **(m if isinstance(m, dict) else {"value": m})} for t, m in shots.items()]
        out.append("<h3>Zero-shot tasks</h3>" + table(rows, first="task"))
    for k, v in e.items():
        if k != "zero_shot" and isinstance(v, dict) and v:
            out.append(f"<h3>{escape(k)}</h3>" + kv_table(v.items()))
    return "".join(out)


def size_latency(run: Run, drawn: dict[str, bytes]) -> str:
    b = run.bench
    if b is None:
        return ("<h2>Size and latency</h2>" + _hint("No <code>prunekit_bench.json</code> in this result. Measure "
                "it beside the dense model with <code>prunekit bench MODEL " + escape(str(run.path)) + " --output "
                + escape(str(run.path / "prunekit_bench.json")) + "</code>, or pass a bench file with "
                "<code>prunekit report ... --bench FILE</code>."))
    batches = [str(x) for x in b.get("batches", [])]
    rows, kernels = [], []
    for m in b.get("models", []):
        if not isinstance(m, dict):
            continue
        ck = m.get("checkpoint") or {}
        row = {"model": m.get("label"), "params": m.get("params_total"), "nonzero": m.get("params_nonzero"),
               "weights file (MiB)": ck["file_bytes"] / 2**20 if "file_bytes" in ck else None,
               "format": ck.get("format"),
               f"prefill ms (1x{b.get('prompt_tokens', '?')})": _with_ratio(m.get("prefill_ms"),
                                                                            m.get("prefill_vs_first"))}
        for x in batches:
            row[f"decode tok/s b{x}"] = _with_ratio((m.get("decode_tokens_per_s") or {}).get(x),
                                                    (m.get("decode_vs_first") or {}).get(x))
        row.update({"peak MB": m.get("peak_memory_mb"), "_path": m.get("path")})
        rows.append(row)
        if m.get("kernel"):
            kernels.append(f"<li><b>{escape(str(m.get('label')))}</b>: {escape(str(m['kernel']))}</li>")
    here = run.path.resolve()

    def this(row: dict[str, Any]) -> str | None:  # the bench row of this result stands out
        return "this" if row["_path"] and Path(str(row["_path"])).expanduser().resolve() == here else None

    columns = [c for c in (rows[0] if rows else {}) if c != "_path"]
    setup = (f"device {b.get('device', '?')}, {b.get('dtype', '?')}, {b.get('threads', '?')} threads; prompt "
             f"{b.get('prompt_tokens', '?')} tokens, {b.get('decode_tokens', '?')} decode steps, median of "
             f"{b.get('repeats', '?')} interleaved rounds; ratios against {b.get('baseline', 'the first model')}")
    src = f" (from {run.bench_file})" if run.bench_file else ""
    return ("<h2>Size and latency</h2>" + f"<p class=\"meta\">{escape(setup + src)}</p>"
            + table(rows, columns, first="model", row_class=this)
            + (f"<p class=\"meta\">how the weights ran:</p><ul class=\"meta\">{''.join(kernels)}</ul>"
               if kernels else "")
            + image(drawn, "latency"))


def _with_ratio(value: Any, ratio: Any) -> str | None:
    """``12.3 (0.81×)``: a timing beside its ratio to the first model."""
    if not isinstance(value, (int, float)):
        return None
    return number(float(value)) + (f" ({ratio:.2f}×)" if isinstance(ratio, (int, float)) else "")


def layers_table(stage: dict[str, Any]) -> str:
    layers = stage["layers"]
    rows = [{"layer": n, **{k: v for k, v in (d if isinstance(d, dict) else {"value": d}).items()}}
            for n, d in layers.items()]
    return folded(f"per-layer table ({len(rows):,} layers)", table(rows, first="layer"))


def groups_table(stage: dict[str, Any]) -> str:
    rows = []
    for g in stage["groups"]:
        if isinstance(g, dict):
            before, removed = g.get("units_before"), g.get("removed")
            after = before - removed if isinstance(before, int) and isinstance(removed, int) else None
            rows.append({"name": g.get("name"), "kind": g.get("kind"), "units_before": before, "removed": removed,
                         "units_after": after, **{k: v for k, v in g.items() if k not in ("name", "kind")}})
    return folded(f"per-group table ({len(rows):,} groups)", table(rows, first="name"))


def loss_summary(curve: dict[str, Any]) -> str:
    parts = []
    for k in ("loss", "lm", "kl", "hidden"):
        v = curve.get(k)
        if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            parts.append(f"{k}: {number(float(v[0]))} → {number(float(v[-1]))}")
    steps = curve.get("step")
    n = len(steps) if isinstance(steps, list) else max((len(v) for v in curve.values() if isinstance(v, list)),
                                                       default=0)
    return f"<p>loss curve, {n:,} points; " + escape("; ".join(parts) or "no loss values") + "</p>"


def candidates_table(stage: dict[str, Any]) -> str:
    rows = [c for c in stage["candidates"] if isinstance(c, dict)]
    chosen = [c for c in rows if c.get("chosen")]
    note = f"{len(rows):,} candidates; the chosen one is highlighted" if chosen else f"{len(rows):,} candidates"
    return (f"<h3>Budget candidates</h3><p class=\"meta\">{escape(note)}</p>"
            + table(rows, row_class=lambda r: "chosen" if r.get("chosen") else None))


def stage_section(stage: dict[str, Any]) -> str:
    title = f"Stage {stage.get('stage', '?')}: {stage.get('kind', '?')}"
    detail = ", ".join(str(stage[k]) for k in ("method", "structure", "structures", "pattern") if stage.get(k))
    parts = [f"<h3>{escape(title + (f' ({detail})' if detail else ''))}</h3>"]
    scalars = [(k, v) for k, v in stage.items() if k not in OWN_SECTION and k != "sparsity_of" and
               (_is_scalar(v) or isinstance(v, list) and len(v) <= SHORT_LIST and all(_is_scalar(x) for x in v)
                or isinstance(v, dict) and len(v) <= 4 and all(_is_scalar(x) for x in v.values()))]
    parts.append(kv_table(scalars, pairs=2 if len(scalars) > 8 else 1))
    if isinstance(stage.get("layers"), dict) and stage["layers"]:
        parts.append(layers_table(stage))
    if isinstance(stage.get("groups"), list) and stage["groups"]:
        parts.append(groups_table(stage))
    if isinstance(stage.get("loss_curve"), dict):
        parts.append(loss_summary(stage["loss_curve"]))
    if isinstance(stage.get("candidates"), list) and stage["candidates"]:
        parts.append(candidates_table(stage))
    shown = {k for k, _ in scalars} | set(OWN_SECTION) | {"sparsity_of"}
    for k, v in stage.items():
        if k in shown:
            continue
        if isinstance(v, dict):
            items = [(str(a), b) for a, b in list(v.items())[:MAX_ROWS]]
            parts.append(folded(f"{k} ({len(v):,} entries)", kv_table(items)))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            parts.append(folded(f"{k} ({len(v):,} rows)", table(v)))
        elif isinstance(v, list):
            parts.append(folded(f"{k} ({len(v):,} items)", f"<pre>{escape(', '.join(number(x) for x in v[:2000]))}"
                                                           + (" …" if len(v) > 2000 else "") + "</pre>"))
    return "".join(parts)


def charts_section(run: Run, drawn: dict[str, bytes]) -> str:
    out = []
    if "sparsity" in drawn:
        out.append("<h2>Per-layer sparsity</h2><p class=\"meta\">bars: zeros per layer after the stage; dots: "
                   "the amount the allocation asked for</p>" + image(drawn, "sparsity"))
    if "widths" in drawn:
        out.append("<h2>Widths per group</h2><p class=\"meta\">units of each group before (grey) and after "
                   "(green) each structure stage</p>" + image(drawn, "widths"))
    if "loss" in drawn:
        out.append("<h2>Training loss</h2>" + image(drawn, "loss"))
    return "".join(out)


def page(run: Run, drawn: dict[str, bytes]) -> str:
    """The whole page."""
    recipe = (f"<pre>{escape(run.recipe)}</pre>" if run.recipe is not None else
              _hint("No <code>prunekit_recipe.yaml</code> in this result."))
    stages = "".join(stage_section(s) for s in run.stages) or _hint("The report lists no stages.")
    body = (header(run) + summary(run) + quality(run) + size_latency(run, drawn) + charts_section(run, drawn)
            + "<h2>Stages</h2>" + stages + "<h2>Recipe</h2>" + recipe)
    title = escape(f"prunekit report: {run.path.name}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{STYLE}</style>"
            f"</head><body><main>{body}</main></body></html>\n")


__all__ = ["page", "number", "cell"]
