"""Breadth checks: run every pruning job on one model and say, honestly, how it went.

A job is one-shot (Wanda or SparseGPT, 50% or 2:4) or structural (neurons, heads, layers,
experts at a ratio). Its outcome is one of:

- ``ok``: the job ran, the amounts are exact (per-layer sparsity for one-shot; the report's
  parameter count matches the model), the pruned model runs with finite outputs, and for a
  structural job the report calls exact, the pruned model equals the masked one;
- ``n/a``: the model has no such structure (prunekit said so with :class:`NoSuchStructure`);
- ``refused``: prunekit raised a specific error of its own (:class:`PrunekitError`);
- ``broken``: the pruned model no longer runs;
- ``wrong``: a check failed (an amount, or an ``exact`` result that differs from masking);
- ``crash``: any other exception (an ``IndexError`` from inside the model is a bug);
- ``timeout``: the job did not end in time (run in a forked child, see :func:`run_isolated`).
"""
from __future__ import annotations

import copy
import multiprocessing as mp
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import NoSuchStructure, PrunekitError, StructureError


@dataclass(frozen=True)
class Job:
    """``kind``: ``oneshot`` or ``structure``; ``what``: the method (one-shot) or structure;
    ``amount``: sparsity, ``"2:4"``, or a ratio."""

    kind: str
    what: str
    amount: Any

    @property
    def name(self) -> str:
        return f"{self.what} {self.amount}"


ONESHOT = [Job("oneshot", m, a) for m in ("wanda", "sparsegpt") for a in (0.5, "2:4")]
STRUCTURES = [Job("structure", s, r) for s in ("neurons", "heads", "layers", "experts") for r in (0.25, 0.5)]
JOBS = ONESHOT + STRUCTURES
#: vision models: structural jobs (one-shot Wanda/SparseGPT prune Linear layers inside a block
#: list, not convolutions)
VISION_JOBS = [Job("structure", s, r) for s in ("channels", "neurons", "heads") for r in (0.25, 0.5)]


@dataclass
class Outcome:
    model: str
    job: str
    status: str
    detail: str = ""
    exact: bool | None = None
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    prune_seconds: float | None = None  # the prune call alone, as its report times it (structural jobs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _inputs(model: nn.Module, example: Any) -> Any:
    """A causal LM's token ids go by keyword (its first positional argument may not be them)."""
    if isinstance(example, Tensor) and not example.is_floating_point() and hasattr(model, "config"):
        return {"input_ids": example}
    return example


def _forward(model: nn.Module, example: Any) -> Tensor:
    with torch.no_grad():
        out = model(**example) if isinstance(example, dict) else model(example)
    t = getattr(out, "logits", None)
    if t is None:
        t = getattr(out, "last_hidden_state", out)
    if isinstance(t, (tuple, list)):
        t = t[0]
    return t.float()


def _check_oneshot(model: nn.Module, cfg: Any, job: Job) -> str:
    """'' or what is wrong with the amounts: every target layer at 50% (within one element per
    row) or 2:4 along its inputs."""
    from ..patterns import is_nm
    from ..schedules.oneshot import make_plan

    for block in make_plan(model, cfg).layers:
        for name, target in block.items():
            w = target.weight()  # (out, in)
            if job.amount == "2:4":
                if not is_nm(w, 2, 4) or float((w == 0).float().mean()) < 0.5 - 1e-6:
                    return f"{name} is not 2:4"
            elif abs(float((w == 0).float().mean()) - 0.5) > 1.0 / w.shape[1] + 1e-6:
                return f"{name} has sparsity {float((w == 0).float().mean()):.4f}, not 0.5"
    return ""


def run_job(build: Callable[[], nn.Module], example: Any, job: Job, label: str = "") -> Outcome:
    """Build the model, run ``job`` on it, check the result. Never raises."""
    from ..config import PruneConfig
    from ..schedules import prune_oneshot
    from ..structural import StructureConfig, prune_structure

    start = time.perf_counter()
    out = Outcome(label, job.name, "crash")
    model = original = None
    try:
        model = build()
        out.params_before = sum(p.numel() for p in model.parameters())
        original = copy.deepcopy(model)
        if job.kind == "build":
            problem = ""
        elif job.kind == "oneshot":
            pattern = "2:4" if job.amount == "2:4" else "unstructured"
            cfg = PruneConfig.from_method(job.what, pattern=pattern, sparsity=0.5)
            ids = example["input_ids"] if isinstance(example, dict) else example
            prune_oneshot(model, cfg, ids, progress=False)
            problem = _check_oneshot(model, cfg, job)
        else:
            cfg = StructureConfig(job.what, float(job.amount), "l2" if job.what in ("channels", "neurons", "heads") else None)
            result = prune_structure(model, cfg, data=None if job.what not in ("layers", "experts") else example,
                                     example_inputs=_inputs(model, example))
            out.prune_seconds = round(float(result.report["seconds"]), 3)
            problem = _check_structure(original, model, result.report, example)
            out.exact = bool(result.report.get("exact", True))
        out.params_after = sum(p.numel() for p in model.parameters())
        y = _forward(model, example)
        if not torch.isfinite(y).all():
            problem = problem or "the pruned model's outputs are not finite"
        out.status, out.detail = ("wrong", problem) if problem else ("ok", "")
    except NoSuchStructure as exc:
        out.status, out.detail = "n/a", str(exc)
    except PrunekitError as exc:
        out.status, out.detail = "refused", str(exc)
        damage = _damage(original, model, example)
        if damage:  # an error must not cost the caller their model
            out.status, out.detail = "broken", f"{damage} after: {exc}"
    except Exception as exc:  # noqa: BLE001 - a crash is what this records
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(tb)), "")
        out.status, out.detail = "crash", f"{type(exc).__name__}: {exc} ({where})"
    out.detail = out.detail.replace("\n", " ")[:400]
    out.seconds = round(time.perf_counter() - start, 3)
    return out


def _damage(original: nn.Module | None, model: nn.Module | None, example: Any) -> str:
    """'' when ``model`` is exactly ``original`` again (same tensors, same outputs)."""
    if original is None or model is None:
        return ""
    a, b = original.state_dict(), model.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a):
        return "the model was left changed"
    try:
        same = torch.equal(_forward(model, example), _forward(original, example))
    except Exception as exc:  # noqa: BLE001
        return f"the model no longer runs ({type(exc).__name__})"
    return "" if same else "the model's outputs changed"


def _check_structure(original: nn.Module, model: nn.Module, report: dict[str, Any], example: Any) -> str:
    """'' or what is wrong: parameters counted right; for an exact unit job, pruned == masked."""
    if report.get("params_after") != sum(p.numel() for p in model.parameters()):
        return "params_after in the report differs from the model"
    if report.get("units_removed", 1) == 0:
        return "nothing was removed"
    if report.get("structure") in ("layers", "experts") or not report.get("exact"):
        return ""
    masked = masked_reference(original, report, example)
    a, b = _forward(model, example), _forward(masked, example)
    err = float((a - b).abs().max())
    scale = float(b.abs().max()) + 1e-6
    return "" if err <= 1e-4 * max(1.0, scale) else f"reported exact, but pruned differs from masked by {err:.3g}"


def masked_reference(original: nn.Module, report: dict[str, Any], example: Any) -> nn.Module:
    """``original`` with the units the report says were removed zeroed instead."""
    from ..structural import build_graph, mask_units

    graph = build_graph(original, _inputs(original, example))
    groups = {g.name: g for g in graph.groups}
    units = []
    for entry in report["groups"]:
        g = groups[entry["name"]]
        if "removed_query_heads" in entry:
            pool = [s for u in g.sub_units for s in u]
            units += [pool[i] for i in entry["removed_query_heads"]]
        else:
            units += [g.units[i] for i in entry["removed_indices"]]
    return mask_units(original, units)


def _child(conn: Any, build: Callable[[], nn.Module], example: Any, job: Job, label: str) -> None:
    torch.set_num_threads(1)
    conn.send(run_job(build, example, job, label).to_dict())
    conn.close()


def run_isolated(build: Callable[[], nn.Module], example: Any, job: Job, label: str = "",
                 timeout: float = 120.0) -> Outcome:
    """:func:`run_job` in a forked child, so a hang or a hard crash is one outcome, not the end."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, build, example, job, label))
    start = time.perf_counter()
    proc.start()
    child.close()
    try:
        if parent.poll(timeout):
            got = parent.recv()
            proc.join(5)
            return Outcome(**got)
        status, detail = "timeout", f"no result within {timeout:.0f} s"
    except EOFError:
        status, detail = "crash", "the process died"
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
    if proc.exitcode and proc.exitcode < 0 and status != "timeout":
        detail = f"the process died with signal {-proc.exitcode}"
    return Outcome(label, job.name, status, detail, seconds=round(time.perf_counter() - start, 3))


__all__ = ["Job", "JOBS", "ONESHOT", "STRUCTURES", "VISION_JOBS", "Outcome", "run_job", "run_isolated", "masked_reference"]
