"""The timm sample: which vision models prunekit prunes structurally, exactly, and how fast,
beside Torch-Pruning on the same job when it is installed.

    PYTHONPATH=tests/stubs .venv/bin/python benchmarks/breadth/vision.py [--models a,b] [--no-tp]

timm installs without torchvision (``pip install --no-deps timm``); ``tests/stubs`` supplies the
few torchvision names timm imports. Writes benchmarks/results/breadth_vision.{json,md}.
Torch-Pruning runs its MetaPruner with magnitude (L2) importance on the same model and ratio,
in the same process, so the seconds compare (``pip install --no-deps torch-pruning``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
try:
    import torchvision  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "tests" / "stubs"))

import prunekit.structural  # noqa: E402,F401
from prunekit.evaluate.breadth import VISION_JOBS, Job, Outcome, run_isolated  # noqa: E402

#: small variants of the families timm ships, the ones the issue saw fail included
SAMPLE = ("resnet18 mobilenetv3_small_050 efficientnet_b0 convnext_atto vit_tiny_patch16_224 deit_tiny_patch16_224 "
          "regnetx_002 densenet121 ghostnet_050 mixer_s16_224 rexnet_100 cspdarknet53 res2net50_14w_8s resnest14d "
          "cait_xxs24_224 convit_tiny crossvit_tiny_240 pvt_v2_b0 beit_base_patch16_224 eva02_tiny_patch14_224 "
          "xcit_nano_12_p16_224 edgenext_xx_small sequencer2d_s nfnet_l0 swin_tiny_patch4_window7_224 levit_128s "
          "mobilevit_xxs efficientformer_l1 poolformer_s12 coat_tiny").split()


def build(name: str) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10).eval()


def example(name: str) -> torch.Tensor:
    import timm

    size = timm.get_pretrained_cfg(name).input_size if timm.get_pretrained_cfg(name) else (3, 224, 224)
    return torch.randn(1, *size, generator=torch.Generator().manual_seed(0))


def torch_pruning(name: str, ratio: float) -> dict:
    """Torch-Pruning's outcome on channels at ``ratio``: ok (model runs, params after) or the error."""
    import torch_pruning as tp

    model, x = build(name), example(name)
    start = time.perf_counter()
    try:
        ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 10]
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=ignored)
        pruner.step()
        with torch.no_grad():
            model(x)
        return {"status": "ok", "params_after": sum(p.numel() for p in model.parameters()),
                "seconds": round(time.perf_counter() - start, 3)}
    except Exception as exc:  # noqa: BLE001 - its outcome is what is recorded
        return {"status": "crash", "detail": f"{type(exc).__name__}: {str(exc)[:200]}",
                "seconds": round(time.perf_counter() - start, 3)}


def _tp_isolated(name: str, ratio: float, timeout: float) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=lambda: q.put(torch_pruning(name, ratio)))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return {"status": "timeout", "detail": f"no result within {timeout:.0f} s", "seconds": timeout}
    return q.get() if not q.empty() else {"status": "crash", "detail": "the process died", "seconds": 0.0}


def markdown(rows: dict, seconds: float) -> str:
    jobs = [j.name for j in VISION_JOBS]
    head = [f"# Breadth: timm sample ({time.strftime('%Y-%m-%d')}, {seconds:.0f} s)", "",
            "| model | " + " | ".join(jobs) + " | channels 0.25: prunekit s | Torch-Pruning | TP s |",
            "|---" * (len(jobs) + 4) + "|"]
    for model, r in rows.items():
        by = {o["job"]: o for o in r["prunekit"]}
        cells = [by[j]["status"] + (" (inexact)" if by[j]["exact"] is False else "") for j in jobs]
        tp = r.get("torch_pruning") or {}
        head.append(f"| {model} | " + " | ".join(cells) + f" | {by['channels 0.25']['prune_seconds'] or 0:.2f} | "
                    f"{tp.get('status', '')} | {tp.get('seconds', '')} |")
    status = Counter(o["status"] for r in rows.values() for o in r["prunekit"])
    handled = sum(all(o["status"] in ("ok", "n/a") for o in r["prunekit"]) for r in rows.values())
    return "\n".join(head + ["", f"Models fully handled: {handled} of {len(rows)}; jobs: {dict(status)}"]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(SAMPLE))
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning even when installed")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="breadth_vision")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming from the JSON")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    import timm  # noqa: F401  (imported once, before the jobs fork)
    try:
        import torch_pruning  # noqa: F401
        have_tp = not args.no_tp
    except ImportError:
        have_tp = False
    out_json = args.out / f"{args.name}.json"
    # resumable: models already in the JSON (same sample) are kept, the rest run and are written one by one
    rows: dict = json.loads(out_json.read_text())["results"] if out_json.is_file() and not args.fresh else {}
    start = time.perf_counter()
    names = args.models.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        if name in rows:
            continue
        x = example(name)
        outs = [run_isolated(lambda n=name: build(n), x, job, name, args.timeout).to_dict() for job in VISION_JOBS]
        rows[name] = {"prunekit": outs, "torch_pruning": _tp_isolated(name, 0.25, args.timeout) if have_tp else None}
        bad = " ".join(f"{o['job']}={o['status']}" for o in outs if o["status"] != "ok") or "all ok"
        tp = rows[name]["torch_pruning"]
        print(f"[{i + 1}/{len(names)}] {name}: {bad}" + (f" | TP {tp['status']} {tp['seconds']}s" if tp else ""),
              flush=True)
        write(args, rows, time.perf_counter() - start)
    print(markdown(rows, time.perf_counter() - start).splitlines()[-1])


def write(args: argparse.Namespace, rows: dict, seconds: float) -> None:
    payload = {"timm": __import__("timm").__version__, "torch": torch.__version__, "seconds": round(seconds, 1),
               "results": rows}
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    (args.out / f"{args.name}.md").write_text(markdown(rows, seconds))


if __name__ == "__main__":
    main()
