"""Command line: ``prunekit prune | eval | list``. With ``--json`` the last stdout line is one
JSON object; logs and progress go to stderr. Errors exit with status 2 and write nothing."""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import PrunekitError

log = logging.getLogger("prunekit")

EPILOG = """MODEL: a local Hugging Face directory, a hub id, a .gguf file, or 'default'
(SmolLM2-135M-Instruct). TEXT: a local text file, 'default' (bundled Python docstring
corpus; disjoint calibration and evaluation parts), or a hub dataset name (wikitext2, c4)."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")


def _placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where the model computes (default auto: a GPU if there is one). A model larger than the "
                        "GPU stays in CPU memory and each block is moved to the GPU while it is calibrated")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load and prune the model in (default auto: as stored); statistics always "
                        "accumulate in float32/float64")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Prune PyTorch models.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prune,eval,list}")

    p = sub.add_parser("prune", help="prune a causal LM (weights, or whole structures) and save it", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--method", default=None,
                   help="weights: magnitude, random, wanda or sparsegpt (default wanda); with --structure: "
                        "flap (default), wanda, taylor, l2, l1, random, bn_scale; layers: block-influence "
                        "(default), random; experts: frequency (default), router-norm, random")
    p.add_argument("--structure", choices=["channels", "neurons", "heads", "width", "layers", "experts"],
                   help="remove whole structures instead of single weights: channels (hidden width on "
                        "transformers), neurons (MLP), heads (attention), layers (blocks), experts (MoE)")
    p.add_argument("--ratio", type=float, default=None, help="with --structure: fraction of units removed, in [0, 1)")
    p.add_argument("--heads", default="kv", choices=["kv", "query"],
                   help="with --structure heads: remove whole key/value groups (kv) or the same number of "
                        "query heads from every group (query)")
    p.add_argument("--round-to", type=int, default=1, help="with --structure: keep a multiple of this many units")
    p.add_argument("--latency", action="store_true",
                   help="with --structure: also time the dense and the pruned model on one calibration window "
                        "(median of interleaved repeats) and report latency_ms_before/after")
    p.add_argument("--override", action="append", default=[], metavar="REGEX=R",
                   help="with --structure: groups whose name matches REGEX lose R of their units instead "
                        "(repeatable; first match wins), e.g. --override 'layers\\.0\\.=0'")
    p.add_argument("--recipe", help="YAML recipe (from a saved result); replaces --method and the axis flags")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of weights removed, in [0, 1) (default 0.5)")
    p.add_argument("--pattern", default="unstructured",
                   help="unstructured (each score's own comparison group), unstructured:row, unstructured:layer, or N:M like 2:4")
    p.add_argument("--allocation", default="uniform", help="uniform, global or owl (structures: uniform or global)")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M (default 5)")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL sparsity spread lambda (default 0.08)")
    p.add_argument("--calib", default="default", metavar="TEXT", help="calibration text (default: bundled corpus)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--sequential", default="layer", choices=["layer", "block"],
                   help="layer (default): prune each layer just before it runs, from the outputs of the already "
                        "pruned layers, one pass per block (every calibration batch in flight); block: statistics "
                        "from the unpruned block, two passes, one batch in flight (less memory)")
    p.add_argument("--offload", default="none", choices=["none", "cpu", "disk"],
                   help="where block inputs wait between blocks: where blocks compute (none), CPU memory while "
                        "blocks run on a GPU (cpu), or memory-mapped files (disk)")
    p.add_argument("--unreached", default="magnitude", choices=["magnitude", "dense"],
                   help="layers no calibration token reaches (MoE experts nobody routes to): prune them by "
                        "magnitude (default) or leave them dense; the report names them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT lazy-update block size")
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT dampening, fraction of mean Hessian diagonal")
    p.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="leave layers whose name matches dense (repeatable)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="directory to save the pruned model in")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--eval", metavar="TEXT", help="also report perplexity on TEXT after pruning")
    p.add_argument("--eval-max-tokens", type=int, default=None)
    _placement(p)
    _common(p)

    e = sub.add_parser("eval", help="perplexity and sparsity of a model", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model", metavar="MODEL")
    e.add_argument("--text", default="default", metavar="TEXT", help="evaluation text (default: bundled corpus)")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    _placement(e)
    _common(e)

    ls = sub.add_parser("list", help="list methods, scores, patterns, allocations, reconstructions")
    ls.add_argument("--json", action="store_true")
    return parser


def _config(args: argparse.Namespace):
    from .config import Allocation, Calibration, PruneConfig, SparseGPTParams, Target
    from .errors import ConfigError
    from .structural import StructureConfig

    if args.recipe:
        import yaml

        if not Path(args.recipe).is_file():
            raise ConfigError(f"recipe file {args.recipe} does not exist")
        try:
            body = yaml.safe_load(Path(args.recipe).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read recipe {args.recipe}: {exc}") from exc
        if isinstance(body, dict) and "structural" in body:
            return StructureConfig.from_dict(body)
        return PruneConfig.from_yaml(Path(args.recipe))
    if args.structure:
        if args.sparsity is not None:
            raise ConfigError("--sparsity is for weight pruning; with --structure give --ratio (fraction of units removed)")
        if args.ratio is None:
            raise ConfigError("--structure needs --ratio R, the fraction of units to remove, e.g. --ratio 0.25")
        return StructureConfig.create(
            args.structure, args.ratio, args.method, allocation=args.allocation, ignore=tuple(args.ignore),
            overrides=tuple(_override(o) for o in args.override),
            heads=args.heads, round_to=args.round_to, nsamples=args.nsamples, seqlen=args.seqlen,
            batch_size=args.batch_size, seed=args.seed)
    if args.ratio is not None:
        raise ConfigError("--ratio goes with --structure; for weight pruning give --sparsity")
    return PruneConfig.from_method(
        args.method or "wanda", sparsity=args.sparsity, pattern=args.pattern,
        allocation=Allocation(args.allocation, args.owl_m, args.owl_lambda),
        calibration=Calibration(args.nsamples, args.seqlen, args.batch_size, args.seed, args.sequential,
                                args.offload),
        sparsegpt=SparseGPTParams(args.blocksize, args.damp), target=Target(tuple(args.ignore)), seed=args.seed,
        unreached=args.unreached,
    )


def _override(text: str) -> tuple[str, float]:
    from .errors import ConfigError

    regex, sep, ratio = text.rpartition("=")
    try:
        if not sep or not regex:
            raise ValueError
        return regex, float(ratio)
    except ValueError:
        raise ConfigError(f"--override {text!r}: use REGEX=R, e.g. 'layers\\.0\\.=0.1'") from None


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    from .api import calibration_data, evaluate_perplexity, prune
    from .evaluate import peak_rss_mb
    from .export import check_output
    from .models.loading import load_model
    from .models.placement import parse_device, parse_dtype, place
    from .structural import StructureConfig

    t0 = time.perf_counter()
    config = _config(args)  # bad flags fail here, before anything is loaded or written
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    check_output(args.output, args.overwrite)
    if isinstance(config, StructureConfig):
        return cmd_structure(args, config, t0, device, dtype)
    model, tokenizer, _ = load_model(args.model, dtype)
    device = place(model, device)
    data = calibration_data(tokenizer, args.calib, config) if config.needs_data else None
    result = prune(model, config, data, tokenizer=tokenizer, progress=not args.quiet, device=device)
    out: dict[str, Any] = {k: result.report[k] for k in (
        "method", "pattern", "allocation", "target_sparsity", "sparsity", "params_total", "params_nonzero", "seconds")}
    if "nm_valid" in result.report:
        out["nm_valid"] = result.report["nm_valid"]
    if args.eval:
        ppl = evaluate_perplexity(model, tokenizer, args.eval, seqlen=config.calibration.seqlen,
                                  max_tokens=args.eval_max_tokens, progress=not args.quiet)
        out.update(perplexity=ppl.perplexity, tokens=ppl.tokens)
        result.report.update(perplexity=ppl.perplexity, eval_tokens=ppl.tokens, eval_text=args.eval)
    result.report.update(calib=args.calib, model=args.model)
    out["output"] = str(result.save(args.output, overwrite=args.overwrite))
    out.update(total_seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
    log.info("saved to %s (sparsity %.4f, %.1f s)", out["output"], out["sparsity"], out["seconds"])
    return out


def cmd_structure(args: argparse.Namespace, config: Any, t0: float, device: Any, dtype: Any) -> dict[str, Any]:
    """``prune --structure``: remove whole units and save a smaller dense model."""
    from .api import evaluate_perplexity
    from .calibration.text import calibration_windows, load_text, tokenize
    from .evaluate import peak_rss_mb
    from .models.loading import load_model
    from .models.placement import place
    from .structural import prune_structure

    model, tokenizer, _ = load_model(args.model, dtype)
    device = place(model, device)
    if tokenizer is None:
        from .errors import ModelLoadError

        raise ModelLoadError(f"{args.model} has no tokenizer; structural pruning from the CLI needs one for --calib")
    ids = tokenize(tokenizer, load_text(args.calib, "calib"))
    data = calibration_windows(ids, config.nsamples, config.seqlen, config.seed)
    dense = copy.deepcopy(model) if args.latency else None
    result = prune_structure(model, config, data=data, tokenizer=tokenizer, progress=not args.quiet, device=device)
    r = result.report
    if dense is not None:
        from .evaluate import latencies_ms

        ms = latencies_ms({"dense": dense, "pruned": model}, lambda: {"input_ids": data[:1].to(next(model.parameters()).device), "use_cache": False},
                          repeats=10)
        r.update(latency_ms_before=ms["dense"], latency_ms_after=ms["pruned"], latency_tokens=int(data.shape[1]))
        del dense
    out: dict[str, Any] = {k: r[k] for k in (
        "structure", "ratio", "method", "params_before", "params_after", "macs_before", "macs_after", "seconds", "exact",
        "latency_ms_before", "latency_ms_after") if k in r}
    if args.eval:
        ppl = evaluate_perplexity(model, tokenizer, args.eval, seqlen=config.seqlen,
                                  max_tokens=args.eval_max_tokens, progress=not args.quiet)
        out.update(perplexity=ppl.perplexity, tokens=ppl.tokens)
        r.update(perplexity=ppl.perplexity, eval_tokens=ppl.tokens, eval_text=args.eval)
    r.update(calib=args.calib, model=args.model)
    out["output"] = str(result.save(args.output, overwrite=args.overwrite))
    out.update(total_seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
    log.info("saved to %s (%d -> %d params, %.1f s)", out["output"], r["params_before"], r["params_after"], r["seconds"])
    return out


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from .api import evaluate_perplexity
    from .evaluate import peak_rss_mb, sparsity_report
    from .models.loading import load_model
    from .models.placement import parse_device, parse_dtype, place

    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    model, tokenizer, _ = load_model(args.model, dtype)
    place(model, device)
    t0 = time.perf_counter()
    ppl = evaluate_perplexity(model, tokenizer, args.text, seqlen=args.seqlen, max_tokens=args.max_tokens,
                              progress=not args.quiet)
    seconds = time.perf_counter() - t0
    report = sparsity_report(model)
    log.info("perplexity %s on %d tokens", ppl.perplexity, ppl.tokens)
    return {"perplexity": ppl.perplexity, "nll": ppl.nll, "tokens": ppl.tokens, "sparsity": report["sparsity"],
            "params_total": report["params_total"], "params_nonzero": report["params_nonzero"],
            "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def cmd_list(args: argparse.Namespace) -> dict[str, Any]:
    from .allocation import ALLOCATIONS
    from .config import METHODS
    from .patterns import PATTERNS
    from .reconstruct import RECONSTRUCTIONS
    from .scoring import SCORES
    from .schedules.at_init import INIT_SCORES
    from .structural import GROUP_SCORES
    from .structural.experts import EXPERT_SCORES
    from .structural.layers import LAYER_SCORES

    info = {
        "methods": {m: {"score": METHODS.get(m)[0], "reconstruction": METHODS.get(m)[1]} for m in METHODS.names()},
        "scores": SCORES.names(),
        "patterns": PATTERNS.names() + ["N:M (e.g. 2:4, 4:8)"],
        "allocations": ALLOCATIONS.names(),
        "reconstructions": RECONSTRUCTIONS.names(),
        "structures": ["channels", "neurons", "heads", "width", "layers", "experts"],
        "structural_scores": GROUP_SCORES.names(),
        "layer_scores": LAYER_SCORES.names(),
        "expert_scores": EXPERT_SCORES.names(),
        "init_scores": INIT_SCORES.names(),
    }
    if not args.json:
        for key, value in info.items():
            items = [f"{k} (score={v['score']}, reconstruction={v['reconstruction']})" for k, v in value.items()] \
                if isinstance(value, dict) else value
            print(f"{key}:\n  " + "\n  ".join(items))
    return info


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    commands = {"prune": cmd_prune, "eval": cmd_eval, "list": cmd_list}
    try:
        out = commands[args.command](args)
    except PrunekitError as exc:
        print(f"prunekit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted (no partial output is ever left behind)", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(_finite(out)))
    elif args.command != "list":
        for key, value in out.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
