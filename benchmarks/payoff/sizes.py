"""File sizes of pruned SmolLM2-135M in each checkpoint format, with bit-exact round trips.

For 50% unstructured (Wanda), 2:4 (Wanda) and 20% of the MLP neurons removed (FLAP), in float32
and bfloat16: the weights file of ``--format dense`` (``model.safetensors``) and of
``--format compact`` (:mod:`prunekit.export.compact`), against the dense model's; each saved
directory is reloaded with ``prunekit.load`` and every tensor compared bit for bit with the
in-memory pruned model, and the logits of a held-out window compared exactly. Writes
benchmarks/results/payoff_sizes.{json,md}.

    .venv/bin/python benchmarks/payoff/sizes.py            # ~5 min on 2 cores
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
#: (label, prune config for prunekit.prune)
CASES: list[tuple[str, Any]] = [
    ("50% unstructured (wanda)", {"method": "wanda", "sparsity": 0.5}),
    ("2:4 (wanda)", {"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}),
    ("20% neurons (flap)", None),
]


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if a.keys() != b.keys():
        return False
    return all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
               and torch.equal(a[k].contiguous().view(ints[a[k].element_size()]),
                               b[k].contiguous().view(ints[b[k].element_size()])) for k in a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--out", default=str(RESULTS / "payoff_sizes"))
    args = p.parse_args()
    import prunekit
    from prunekit.calibration.text import calibration_windows, load_text, tokenize
    from prunekit.export.compact import checkpoint_info
    from prunekit.structural import StructureConfig

    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prunekit-sizes-") as tmp:
        for dtype in args.dtypes:
            base, tok = prunekit.load(args.model, dtype=dtype)
            calib = calibration_windows(tokenize(tok, load_text("default", "calib")), args.nsamples, args.seqlen, 0)
            window = tokenize(tok, load_text("default", "eval"))[: args.seqlen][None]
            dense_dir = prunekit.Result(base, tokenizer=tok).save(Path(tmp) / f"dense-{dtype}")
            dense_bytes = checkpoint_info(dense_dir)["file_bytes"]
            rows.append({"case": "dense", "dtype": dtype, "format": "dense", "file_bytes": dense_bytes,
                         "vs_dense": 1.0, "bit_exact": True, "params": sum(t.numel() for t in base.parameters())})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            for label, config in CASES:
                model = copy.deepcopy(base)
                config = config or StructureConfig.create("neurons", 0.2, "flap")
                result = prunekit.prune(model, config, calib, tokenizer=tok, progress=False)
                with torch.no_grad():
                    logits = model(window).logits
                for fmt in ("dense", "compact"):
                    t = time.perf_counter()
                    out = result.save(Path(tmp) / f"{label}-{dtype}-{fmt}".replace(" ", "_").replace("%", "")
                                      .replace(":", "of").replace("(", "").replace(")", ""), format=fmt)
                    save_s = time.perf_counter() - t
                    state = model.state_dict()  # as saved: saving may add the zero biases a config switch needs
                    t = time.perf_counter()
                    back = prunekit.load(str(out))
                    load_s = time.perf_counter() - t
                    with torch.no_grad():
                        same_logits = torch.equal(back.model(window).logits, logits)
                    info = checkpoint_info(out)
                    rows.append({"case": label, "dtype": dtype, "format": fmt, "written": info["format"],
                                 "file_bytes": info["file_bytes"], "vs_dense": info["file_bytes"] / dense_bytes,
                                 "tensors": info.get("tensors"), "bit_exact": same_bits(state, back.model.state_dict())
                                 and same_logits, "save_seconds": save_s, "load_seconds": load_s,
                                 "params": sum(t.numel() for t in model.parameters()),
                                 "params_nonzero": sum(int(t.count_nonzero()) for t in model.parameters())})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                    del back
                del model, result
    result = {"model": args.model, "rows": rows, "wall_seconds": time.perf_counter() - t_start}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(result) + "\n")
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lines = ["SmolLM2-135M weights files by checkpoint format (`--format dense|compact`); `vs dense` is against the "
             "unpruned model's `model.safetensors` in the same dtype; `bit-exact`: every tensor reloaded by "
             "`prunekit.load` equals the pruned model's bit for bit and so do the logits of a held-out window. "
             "'written' says what compact wrote: a model packing would shrink by under 1% (structure removed only) is saved "
             f"dense. Wall time {r['wall_seconds'] / 60:.1f} min.", "",
             "| case | dtype | --format | written | weights MB | vs dense | tensors (dense/sparse/nm) | bit-exact | "
             "load s |", "|---|---|---|---|---:|---:|---|---|---:|"]
    for row in r["rows"]:
        t = row.get("tensors")
        kinds = f"{t['dense']}/{t['sparse']}/{t['nm']}" if t else ""
        load = f"{row['load_seconds']:.1f}" if "load_seconds" in row else ""
        lines.append(f"| {row['case']} | {row['dtype']} | {row['format']} | {row.get('written', 'dense')} | "
                     f"{row['file_bytes'] / 1e6:.1f} | {row['vs_dense']:.2f}× | {kinds} | "
                     f"{'yes' if row['bit_exact'] else 'NO'} | {load} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
