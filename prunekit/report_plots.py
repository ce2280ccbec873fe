"""The charts of ``prunekit report``, each a PNG as bytes (None when there is nothing to draw).

Figures are built with ``matplotlib.figure.Figure`` and its Agg canvas directly, never through
``pyplot``: no backend is switched and no process-wide figure registry is touched, so it runs
headless and beside any other matplotlib user in the same process."""
from __future__ import annotations

import io
from typing import Any, Sequence

from .errors import PrunekitError

#: the most layer or group names written under a bar chart (every k-th one past that)
MAX_TICKS = 48
#: loss-curve series drawn when present, in this order
LOSS_KEYS = ("loss", "lm", "kl", "hidden")


def require_matplotlib() -> None:
    """Fail before anything is written when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError as exc:
        raise PrunekitError(f"prunekit report draws its charts with matplotlib, which is not installed ({exc}); "
                            "`pip install matplotlib` (or the extra: pip install 'prunekit[train]')") from None


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _short(name: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``3.mlp.down_proj``: the prefix every name shares says nothing."""
    for prefix in ("model.layers.", "model.decoder.layers.", "transformer.h.", "model.", "layers."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _ticks(ax: Any, names: Sequence[str]) -> None:
    step = max(1, -(-len(names) // MAX_TICKS))  # ceil
    at = list(range(0, len(names), step))
    labels = [_short(names[i]) for i in at]
    ax.set_xticks(at, labels, rotation=90 if len(at) * max(map(len, labels)) > 120 else 0, fontsize=7)
    ax.set_xlim(-0.6, len(names) - 0.4)


def _title(stage: dict[str, Any]) -> str:
    detail = ", ".join(str(stage[k]) for k in ("method", "structure", "pattern", "allocation") if stage.get(k))
    return f"stage {stage.get('stage', '?')}: {stage.get('kind', '?')}" + (f" ({detail})" if detail else "")


def sparsity_png(stages: Sequence[dict[str, Any]]) -> bytes | None:
    """Per-layer sparsity (bars) and the allocated amount (dots) of every weights stage."""
    drawn = [s for s in stages if s.get("kind") == "weights" and isinstance(s.get("layers"), dict) and s["layers"]]
    if not drawn:
        return None
    fig = _figure(12, 3.6 * len(drawn))
    for ax, stage in zip(fig.subplots(len(drawn), 1, squeeze=False)[:, 0], drawn):
        names = list(stage["layers"])
        got = [100 * float(stage["layers"][n].get("sparsity") or 0) for n in names]
        ax.bar(range(len(names)), got, color="#3b6ea8", label="sparsity")
        allocated = [stage["layers"][n].get("allocated") for n in names]
        if any(isinstance(a, (int, float)) for a in allocated):
            xs = [i for i, a in enumerate(allocated) if isinstance(a, (int, float))]
            ax.plot(xs, [100 * float(allocated[i]) for i in xs], "o", color="#d9822b", ms=3, label="allocated")
        ax.set_ylabel("zeros (%)")
        ax.set_ylim(0, 100)
        ax.set_title(_title(stage), fontsize=10, loc="left")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
        _ticks(ax, names)
    return _png(fig)


def widths_png(stages: Sequence[dict[str, Any]]) -> bytes | None:
    """Units before and after of every group of every structure stage (grey: removed)."""
    drawn = []  # (stage, its groups of one kind): a budget stage removes several kinds
    for s in stages:
        if s.get("kind") in ("structure", "budget") and isinstance(s.get("groups"), list):
            kinds = dict.fromkeys(g.get("kind") for g in s["groups"] if isinstance(g, dict))
            drawn += [(s, [g for g in s["groups"] if isinstance(g, dict) and g.get("kind") == k]) for k in kinds]
    if not drawn:
        return None
    fig = _figure(12, 3.0 * len(drawn))
    for ax, (stage, groups) in zip(fig.subplots(len(drawn), 1, squeeze=False)[:, 0], drawn):
        names = [str(g.get("name", i)) for i, g in enumerate(groups)]
        before = [float(g.get("units_before") or 0) for g in groups]
        after = [b - float(g.get("removed") or 0) for b, g in zip(before, groups)]
        xs = range(len(groups))
        ax.bar(xs, before, color="#c8ccd2", label="before")
        ax.bar(xs, after, color="#3b8a5a", width=0.6, label="after")
        ax.set_ylabel(str(groups[0].get("kind") or "units"))
        ax.set_title(_title(stage), fontsize=10, loc="left")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
        _ticks(ax, names)
    return _png(fig)


def _series(curve: dict[str, Any]) -> tuple[list[float], dict[str, list[float]]]:
    """The steps and the loss series of one ``loss_curve`` (series of another length are dropped)."""
    lines = {k: [float(v) for v in curve[k]] for k in LOSS_KEYS if isinstance(curve.get(k), list) and curve[k]}
    n = max((len(v) for v in lines.values()), default=0)
    steps = curve.get("step")
    steps = [float(s) for s in steps] if isinstance(steps, list) and len(steps) == n else [float(i) for i in range(n)]
    return steps, {k: v for k, v in lines.items() if len(v) == n}


def loss_png(stages: Sequence[dict[str, Any]]) -> bytes | None:
    """The training loss (and its distillation parts, when recorded) of every stage with a ``loss_curve``."""
    drawn = [(s, *_series(s["loss_curve"])) for s in stages if isinstance(s.get("loss_curve"), dict)]
    drawn = [d for d in drawn if d[2]]
    if not drawn:
        return None
    fig = _figure(12, 3.6 * len(drawn))
    for ax, (stage, steps, lines) in zip(fig.subplots(len(drawn), 1, squeeze=False)[:, 0], drawn):
        for key, values in lines.items():
            ax.plot(steps, values, label=key, lw=1.4, marker="o" if len(values) < 30 else None, ms=3)
        values = [v for vs in lines.values() for v in vs]
        if min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(_title(stage), fontsize=10, loc="left")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _png(fig)


def latency_png(bench: dict[str, Any]) -> bytes | None:
    """Prefill milliseconds and decode tokens/s per batch of every model ``prunekit bench`` measured."""
    rows = [r for r in bench.get("models", []) if isinstance(r, dict) and isinstance(r.get("prefill_ms"), (int, float))]
    if not rows:
        return None
    labels = [_label(str(r.get("label", i))) for i, r in enumerate(rows)]
    batches = [str(b) for b in bench.get("batches", [])]
    fig = _figure(12, 0.5 * len(rows) + 2.4)
    left, right = fig.subplots(1, 2)
    ys = range(len(rows))
    left.barh(ys, [r["prefill_ms"] for r in rows], color="#3b6ea8")
    left.set_yticks(ys, labels, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel(f"prefill ms (1x{bench.get('prompt_tokens', '?')} tokens; lower is faster)")
    left.grid(axis="x", alpha=0.3)
    height = 0.8 / max(1, len(batches))
    for j, b in enumerate(batches):
        rates = [float((r.get("decode_tokens_per_s") or {}).get(b) or 0) for r in rows]
        right.barh([y - 0.4 + height * (j + 0.5) for y in ys], rates, height=height, label=f"batch {b}")
    right.set_yticks(ys, labels, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("decode tokens/s (higher is faster)")
    right.grid(axis="x", alpha=0.3)
    if batches:
        right.legend(fontsize=8)
    return _png(fig)


def _label(text: str, width: int = 28) -> str:
    """A model label short enough for an axis: the end of a long path."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


__all__ = ["latency_png", "loss_png", "require_matplotlib", "sparsity_png", "widths_png"]
