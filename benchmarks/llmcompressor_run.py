"""Baseline: prune a causal LM with llm-compressor's ``oneshot`` (Wanda or SparseGPT).

Runs in the separate ``.venv-llmc`` environment (llmcompressor 0.14 plus ``prunekit``
installed with ``--no-deps``) so the comparison with prunekit uses the same model, the
same calibration windows (``prunekit.api.calibration_data`` on the ``default`` text) and
the same machine.

What it measures:
  * ``seconds``: wall time of the ``oneshot`` call only (``time.perf_counter``);
  * ``peak_rss_mb``: peak resident memory of the whole process (loading, ``oneshot`` and
    saving), as prunekit's CLI reports it; ``oneshot_peak_rss_mb``: the peak right after
    ``oneshot``, before saving;
  * ``sparsity``: the measured fraction of zeros over the decoder blocks' Linear weights
    (prunekit's ``sparsity_report``, so it counts the same weights prunekit does);
  * ``total_seconds``: the whole run, imports, loading and saving included.

Everything except the sparsity, the mask structure and the targets (decoder Linears,
``lm_head`` ignored) is llm-compressor's default (dampening, block size, batch size,
pipeline); the values used are reported under ``settings``. The pruned model is saved
dense with plain ``save_pretrained`` plus the tokenizer, so ``prunekit eval OUTDIR`` reads it.
Logs go to stderr; with ``--json`` the last stdout line is one JSON object.

    .venv-llmc/bin/python benchmarks/llmcompressor_run.py --method wanda --sparsity 0.5 \\
        --pattern unstructured --nsamples 32 --seqlen 512 --seed 0 --model DIR --output OUT --json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from typing import Any

MASKS = {"unstructured": "0:0", "2:4": "2:4"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", choices=sorted(MASKS), default="unstructured")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", required=True, help="Hugging Face model directory (float32)")
    p.add_argument("--output", required=True, help="directory to save the pruned model in")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p.parse_args(argv)


def run(args: argparse.Namespace, start: float) -> dict[str, Any]:
    try:
        import llmcompressor
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    except ImportError as exc:
        raise SystemExit(f"error: llm-compressor is not importable from {sys.executable} ({exc}); "
                         "install it into .venv-llmc and run this script with .venv-llmc/bin/python") from None
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import prunekit
    from prunekit.api import calibration_data
    from prunekit.evaluate.sparsity import sparsity_report
    from prunekit.models.loading import resolve

    source = resolve(args.model)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)

    config = prunekit.PruneConfig.from_method(
        args.method, sparsity=args.sparsity, pattern=args.pattern,
        calibration=prunekit.Calibration(nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed))
    windows = calibration_data(tokenizer, "default", config)  # (nsamples, seqlen) int64
    dataset = datasets.Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})

    cls = WandaPruningModifier if args.method == "wanda" else SparseGPTModifier
    modifier = cls(sparsity=args.sparsity, mask_structure=MASKS[args.pattern],
                   targets=["Linear"], ignore=["re:.*lm_head"])
    settings = {k: getattr(modifier, k) for k in
                ("mask_structure", "targets", "ignore", "block_size", "dampening_frac") if hasattr(modifier, k)}
    settings.update(batch_size=1, pipeline="sequential (inferred)", shuffle_calibration_samples=False,
                    torch_threads=torch.get_num_threads())

    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, recipe=modifier, dataset=dataset,
            num_calibration_samples=args.nsamples, max_seq_length=args.seqlen,
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    oneshot_peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    nm = (2, 4) if args.pattern == "2:4" else None
    report = sparsity_report(model, nm=nm)
    # oneshot wraps save_pretrained to write compressed-tensors format; save plain dense HF instead.
    vars(model).pop("save_pretrained", None)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the whole process, save included

    result: dict[str, Any] = {
        "tool": "llmcompressor", "version": llmcompressor.__version__, "method": args.method,
        "pattern": args.pattern, "target_sparsity": args.sparsity, "sparsity": report["sparsity"],
        "seconds": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb, 1),
        "oneshot_peak_rss_mb": round(oneshot_peak_rss_mb, 1),
        "total_seconds": round(time.perf_counter() - start, 2),
        "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
        "model": source, "output": args.output, "settings": settings,
        "torch": torch.__version__, "transformers": sys.modules["transformers"].__version__,
    }
    if nm is not None:
        result["nm_valid"] = report["nm_valid"]
    return result


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    stdout = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):  # llm-compressor's logger writes to stdout
            result = run(args, start)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        raise
    if args.json:
        print(json.dumps(result), file=stdout)
    else:
        print(f"{result['method']} {result['pattern']}: sparsity {result['sparsity']:.4f}, oneshot "
              f"{result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MiB -> {args.output}", file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
