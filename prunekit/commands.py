"""What each ``prunekit`` command does, once :mod:`prunekit.cli` has parsed its flags."""
from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import time
from pathlib import Path
from dataclasses import replace
from typing import Any

from .summary import summary_table

log = logging.getLogger("prunekit")

#: the JSON fields of ``prune`` per stage kind (the contract scripts read)
PRUNE_FIELDS = {
    "tokens": ("method", "keep", "r", "after", "tokens_in", "tokens_out", "macs_ratio", "latency_ms",
               "dense_latency_ms", "speedup", "continuation_perplexity", "uncut_continuation_perplexity",
               "prompt_tokens", "windows", "embedding_cosine", "attn_implementation"),
    "weights": ("method", "pattern", "allocation", "target_sparsity", "sparsity", "params_total", "params_nonzero",
                "seconds", "nm_valid", "unreached", "data_parallel"),
    "budget": ("structures", "metric", "target_params", "target_macs", "target_latency_ms", "method", "params_before",
               "params_after", "macs_before", "macs_after", "chosen", "candidates", "smallest_reachable", "round_to",
               "latency_ms_before", "latency_ms_after", "loss_held_out", "exact", "seconds"),
    "structure": ("structure", "ratio", "method", "params_before", "params_after", "macs_before", "macs_after",
                  "seconds", "exact", "latency_ms_before", "latency_ms_after", "ratio_achieved", "units_before",
                  "units_removed"),
}


def _override(text: str) -> tuple[str, float]:
    from .errors import ConfigError

    regex, sep, ratio = text.rpartition("=")
    try:
        if not sep or not regex:
            raise ValueError
        return regex, float(ratio)
    except ValueError:
        raise ConfigError(f"--override {text!r}: use REGEX=R, e.g. 'layers\\.0\\.=0.1'") from None


def _allocation(args: argparse.Namespace) -> Any:
    from .config import Allocation
    from .errors import ConfigError

    owl = {k: v for k, v in (("m", args.owl_m), ("lambda", args.owl_lambda)) if v is not None}
    if owl and args.allocation != "owl":
        raise ConfigError("--owl-m and --owl-lambda go with --allocation owl")
    return Allocation(args.allocation, params=tuple(owl.items()))


def _block_range(text: str | None) -> tuple[int, int] | None:
    """``START:STOP`` -> (start, stop)."""
    from .errors import ConfigError

    if text is None:
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"--blocks {text!r}: write START:STOP with block indices, e.g. --blocks 4:30")
    return int(parts[0]), int(parts[1])


def prune_recipe(args: argparse.Namespace) -> Any:
    """The recipe ``prunekit prune`` runs: a saved recipe, or one stage built from the flags."""
    from .config import PruneConfig, Target
    from .reconstruct.sparsegpt import SparseGPTParams
    from .recipe import CalibrationSpec, Recipe, one_stage
    from .structural import StructureConfig

    if args.recipe:
        recipe = Recipe.from_yaml(Path(args.recipe))
        return Recipe(recipe.stages, replace(recipe.calibration, text=args.calib)) if args.calib != "default" else recipe
    if args.structure and getattr(args, "target_params", None) is None and getattr(args, "target_macs", None) is None \
            and getattr(args, "target_latency", None) is None:
        spec = CalibrationSpec(args.calib, args.nsamples, args.seqlen, args.seed, args.batch_size)
        stage = StructureConfig.create(
            args.structure, args.ratio, args.method, allocation=args.allocation, ignore=tuple(args.ignore),
            overrides=tuple(_override(o) for o in args.override), heads=args.heads, round_to=args.round_to,
            blocks=_block_range(args.blocks),
            nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, seed=args.seed)
        return one_stage(stage, spec)
    if args.structure:  # a budget: the search picks the amounts
        from .structural.budget import BudgetStage

        spec = CalibrationSpec(args.calib, args.nsamples, args.seqlen, args.seed, args.batch_size)
        budget = BudgetStage(structures=tuple(args.structure.split(",")), target_params=args.target_params,
                             target_macs=args.target_macs, target_latency_ms=args.target_latency, method=args.method,
                             heads=args.heads, round_to=args.round_to, candidates=args.candidates or 8, seed=args.seed)
        return one_stage(budget, spec)
    spec = CalibrationSpec(args.calib, args.nsamples, args.seqlen, args.seed, args.batch_size, args.sequential,
                           args.offload)
    stage = PruneConfig.from_method(
        args.method or "wanda", sparsity=args.sparsity, pattern=args.pattern,
        allocation=_allocation(args), calibration=spec.as_calibration(),
        sparsegpt=SparseGPTParams(args.blocksize or 128, args.damp or 0.01) if (args.blocksize or args.damp) else None,
        target=Target(tuple(args.ignore)), seed=args.seed,
        unreached=args.unreached, refine=args.refine or "none", permute=bool(args.permute))
    return one_stage(stage, spec)


def _check_inputs(args: argparse.Namespace, recipe: Any) -> None:
    """Every input is checked before the model is loaded: the output path (temporary
    directories of killed runs next to it are cleaned), the calibration and evaluation texts."""
    from .calibration.text import load_text
    from .errors import ConfigError
    from .export import check_output

    if not getattr(args, "dry_run", False):
        if args.output is None:
            raise ConfigError("--output DIR is required (or --dry-run to only print the plan)")
        check_output(args.output, args.overwrite)
    if args.eval_max_tokens is not None and args.eval_max_tokens < 1:
        raise ConfigError(f"--eval-max-tokens must be a positive number of tokens, got {args.eval_max_tokens}")
    if recipe.needs_data:
        load_text(recipe.calibration.text, "calib")
    if args.eval:
        load_text(args.eval, "eval")


def _execute(args: argparse.Namespace, recipe: Any, t0: float, latency: bool = False) -> dict[str, Any]:
    """Check every input, load, evaluate the dense model (cached), run every stage, save,
    then evaluate: the result is on disk before its evaluation starts, so a failed or
    interrupted evaluation keeps it."""
    from .api import load
    from .evaluate import peak_rss_mb
    from .models.placement import parse_device, parse_dtype, place
    from .pipeline import measure, run
    from .recipe import stage_kind

    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    _check_inputs(args, recipe)
    log.info("loading %s", args.model)
    loaded = load(args.model, dtype=dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    device = place(model, device)
    if getattr(args, "dry_run", False):
        return _dry_run(args, recipe, model, tokenizer, t0)
    dense_size = measure(model)
    reshapes = {"structure", "budget"} & {stage_kind(st) for st in recipe.stages}
    dense_macs = None if reshapes else _macs(model)
    dense_ppl = _dense_perplexity(args, model, tokenizer, recipe) if args.eval else None
    dense = copy.deepcopy(model) if latency else None
    previous = loaded if loaded.recipe is not None else None
    start = time.perf_counter()
    resume = resume_dir(args.output) if getattr(args, "resume", False) else None
    result = run(recipe, model, tokenizer=tokenizer, device=device, progress=not args.quiet, previous=previous,
                 checkpoint=resume)
    prune_seconds = time.perf_counter() - start
    report = result.report
    if dense is not None:
        _latency(report, dense, model, tokenizer, recipe)
        del dense
    report.update(calib=recipe.calibration.text, model=args.model)
    log.info("saving to %s", args.output)
    output = str(result.save(args.output, overwrite=args.overwrite, format=args.format))
    if resume is not None:  # the result is whole: the progress that led to it is not needed again
        shutil.rmtree(resume, ignore_errors=True)
    from .evaluate import count_params
    from .export.compact import checkpoint_info

    saved = count_params(model)[0]
    kinds = [stage_kind(s) for s in recipe.stages]
    if len(kinds) == 1:
        out: dict[str, Any] = {k: report[k] for k in PRUNE_FIELDS[kinds[0]] if k in report} \
            if kinds[0] in PRUNE_FIELDS else {}
    else:
        out = {"stages": [_stage_summary(s) for s in report["stages"]], "params_total": report["params_total"],
               "params_nonzero": report["params_nonzero"], "sparsity": report["sparsity"],
               "seconds": sum(s["seconds"] for s in report["stages"])}
    out.setdefault("params_before", report["stages"][0]["params_before"])
    out.setdefault("params_after", report["stages"][-1]["params_after"])
    if saved != out["params_after"]:  # zero biases the config's bias switch needs (plain from_pretrained reloads it)
        out["params_saved"] = saved
    after = measure(model)
    out.update(dense={**dense_size, "macs": report["stages"][0].get("macs_before", dense_macs)},
               pruned_layers_params=after["pruned_layers_params"], sparsity_of=report["stages"][-1]["sparsity_of"],
               prune_seconds=prune_seconds, output=output, checkpoint=checkpoint_info(output))
    if dense_ppl is not None:
        out.update(perplexity_before=dense_ppl[0].perplexity, dense_eval_cached=dense_ppl[1])
        out["dense"].update(perplexity=dense_ppl[0].perplexity, tokens=dense_ppl[0].tokens)
        log.info("evaluating the pruned model on %s (the result is already saved)", args.eval)
        ppl = _evaluate(args, model, tokenizer, recipe)
        out.update(perplexity=ppl.perplexity, tokens=ppl.tokens)
        _save_eval(Path(output), args, recipe, out)
    out.update(total_seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
    out["summary"] = summary_table(out, report)
    log.info("saved to %s (%.1f s)", output, out["total_seconds"])
    return out


def resume_dir(output: str | Path) -> Path:
    """Where ``--resume`` keeps a run's progress: ``.NAME.resume`` beside the output directory."""
    out = Path(output)
    return out.parent / f".{out.name}.resume"


def _save_eval(output: Path, args: argparse.Namespace, recipe: Any, out: dict[str, Any]) -> None:
    """``OUTPUT/prunekit_eval.json``: the perplexities before and after, for ``prunekit report``
    (written atomically once both are known; the saved result does not wait for it)."""
    from .atomic import write_text_atomically
    from .cli import _finite

    record = {"eval": args.eval, "seqlen": recipe.calibration.seqlen, "eval_max_tokens": args.eval_max_tokens,
              "tokens": out["tokens"], "perplexity_before": out["perplexity_before"], "perplexity": out["perplexity"],
              "dense_eval_cached": out["dense_eval_cached"]}
    write_text_atomically(output / "prunekit_eval.json", json.dumps(_finite(record), indent=2, default=str) + "\n")


def _macs(model: Any) -> int | None:
    """MACs of the dense model on one 1x64-token window (the shape structure stages count
    on), for runs whose stages keep every shape. MACs depend on the shape only, so the ids
    are zeros rather than a second tokenisation of the calibration text."""
    import torch

    from .evaluate.macs import count_macs

    device = next(model.parameters()).device
    return count_macs(model, {"input_ids": torch.zeros((1, 64), dtype=torch.long, device=device), "use_cache": False})


def _evaluate(args: argparse.Namespace, model: Any, tokenizer: Any, recipe: Any) -> Any:
    """Perplexity on ``--eval`` with the recipe's window length. A tokens stage is switched off
    for it (it cuts prompts, which windowed perplexity has none of); its own report has the
    continuation perplexity with and without it."""
    import contextlib

    from .api import evaluate_perplexity
    from .tokens.handle import applied

    handle = applied(model)
    if handle is not None:
        log.info("perplexity on %s is measured with the tokens stage off; the stage report has its continuation "
                 "perplexity", args.eval)
    with handle.disabled() if handle is not None else contextlib.nullcontext():
        return evaluate_perplexity(model, tokenizer, args.eval, seqlen=recipe.calibration.seqlen,
                                   max_tokens=args.eval_max_tokens, progress=not args.quiet)


def _dense_perplexity(args: argparse.Namespace, model: Any, tokenizer: Any, recipe: Any) -> tuple[Any, bool]:
    """The dense model's perplexity on the same windows, cached per model + text + windows +
    dtype + device (:mod:`prunekit.evaluate.cache`)."""
    from .evaluate.cache import cached_perplexity, eval_key
    from .models.loading import resolve

    weight = next(model.parameters())
    key = eval_key(resolve(args.model), args.eval, recipe.calibration.seqlen, args.eval_max_tokens,
                   str(weight.dtype), weight.device.type)
    value, cached = cached_perplexity(key, lambda: _evaluate(args, model, tokenizer, recipe))
    log.info("dense perplexity %s on %d tokens%s", value.perplexity, value.tokens, " (cached)" if cached else "")
    return value, cached


def _dry_run(args: argparse.Namespace, recipe: Any, model: Any, tokenizer: Any, t0: float) -> dict[str, Any]:
    from .planning import plan

    p = replace(plan(recipe, model, tokenizer=tokenizer), model=args.model)
    return {"dry_run": True, **p.to_dict(), "model": args.model, "seconds": time.perf_counter() - t0,
            "summary": str(p)}


def _stage_summary(stage: dict[str, Any]) -> dict[str, Any]:
    keep = ("stage", "kind", "params_before", "params_after", "sparsity", "macs_before", "macs_after", "seconds",
            "method", "structure", "ratio", "pattern", "exact", "structures", "chosen",
            *PRUNE_FIELDS["tokens"])
    return {k: stage[k] for k in keep if k in stage}


def _latency(report: dict[str, Any], dense: Any, model: Any, tokenizer: Any, recipe: Any) -> None:
    from .calibration import CalibrationData
    from .evaluate import latencies_ms

    c = recipe.calibration
    ids = CalibrationData.from_text(tokenizer, c.text, 1, c.seqlen, c.seed).ids
    device = next(model.parameters()).device
    ms = latencies_ms({"dense": dense, "pruned": model}, lambda: {"input_ids": ids.to(device), "use_cache": False},
                      repeats=10)
    report.update(latency_ms_before=ms["dense"], latency_ms_after=ms["pruned"], latency_tokens=int(ids.shape[1]))


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    """``prune``: the one-stage shorthand of ``run`` (or a saved recipe with ``--recipe``)."""
    from .cli import check_mode_flags

    t0 = time.perf_counter()
    check_mode_flags(args)
    recipe = prune_recipe(args)  # bad flags fail here, before anything is loaded or written
    return _execute(args, recipe, t0, latency=bool(args.latency))


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    """``run RECIPE MODEL``: every stage in order on one loaded model with one calibration set."""
    from .recipe import Recipe

    t0 = time.perf_counter()
    recipe = Recipe.from_yaml(Path(args.recipe))  # validated before anything is loaded
    if args.calib is not None:
        recipe = Recipe(recipe.stages, replace(recipe.calibration, text=args.calib))
    return _execute(args, recipe, t0)


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from .api import evaluate_perplexity
    from .evaluate import peak_rss_mb, sparsity_report
    from .models.loading import load_model
    from .models.placement import parse_device, parse_dtype, place

    tasks = _zero_shot_tasks(args)
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    model, tokenizer, _ = load_model(args.model, dtype)
    place(model, device)
    out: dict[str, Any] = {}
    if not args.no_perplexity:
        t0 = time.perf_counter()
        ppl = evaluate_perplexity(model, tokenizer, args.eval, seqlen=args.seqlen, max_tokens=args.eval_max_tokens,
                                  progress=not args.quiet)
        seconds = time.perf_counter() - t0
        out.update(perplexity=ppl.perplexity, nll=ppl.nll, tokens=ppl.tokens)
        log.info("perplexity %s on %d tokens", ppl.perplexity, ppl.tokens)
    report = sparsity_report(model)
    out.update(sparsity=report["sparsity"], params_total=report["params_total"],
               params_nonzero=report["params_nonzero"])
    if not args.no_perplexity:
        out["seconds"] = seconds
    if tasks:
        from .evaluate.zero_shot import table, zero_shot

        out["zero_shot"] = zero_shot(model, tokenizer, tasks, include_path=args.include_path, limit=args.limit,
                                     num_fewshot=args.num_fewshot or 0, progress=not args.quiet)
    out["peak_rss_mb"] = peak_rss_mb()
    if tasks:
        out["summary"] = "\n".join([*(f"{k}: {v}" for k, v in out.items() if k != "zero_shot"),
                                    table(out["zero_shot"])])
    return out


def _zero_shot_tasks(args: argparse.Namespace) -> list[str]:
    """``eval --tasks``' names, checked (with lm-eval importable) before the model loads; the
    lm-eval flags without ``--tasks`` are an error naming it."""
    from .errors import ConfigError

    if getattr(args, "tasks", None) is None:
        given = [flag for flag, value in (("--include-path", args.include_path), ("--limit", args.limit),
                                          ("--num-fewshot", args.num_fewshot), ("--no-perplexity", args.no_perplexity))
                 if value not in (None, False)]
        if given:
            raise ConfigError(f"{given[0]} goes with --tasks (lm-eval accuracy); add --tasks LIST or remove it")
        return []
    from .evaluate.zero_shot import require_lm_eval, task_names

    names = task_names(args.tasks)
    require_lm_eval()
    return names


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    """``bench MODEL [PRUNED ...]``: prefill latency, decode tokens/s, peak memory, parameters
    and file size of each model, with ratios against MODEL."""
    from .errors import ConfigError
    from .evaluate.bench import BenchConfig, measure, peak_memory, table
    from .models.loading import load_model
    from .models.placement import parse_device, parse_dtype, place

    config = BenchConfig(prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                         batches=tuple(args.batch), repeats=args.repeats, layers=args.layers,
                         peak_memory=not args.no_peak_memory, sparse_kernels=args.sparse_kernels)
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    output = _json_output(args.output) if getattr(args, "output", None) else None  # fails before any loading
    specs = [args.model, *args.pruned]
    if len(set(specs)) != len(specs):
        raise ConfigError(f"bench got {sorted({s for s in specs if specs.count(s) > 1})[0]!r} twice; name each model once")
    models = {}
    for spec in specs:  # every model is loaded (and checked) before anything is timed
        log.info("loading %s", spec)
        model, tokenizer, source = load_model(spec, dtype)
        place(model, device)
        models[spec] = (model, tokenizer, source if Path(source).is_dir() else None)
    out = measure(models, config, progress=not args.quiet)
    for row in out["models"]:
        if config.peak_memory:
            log.info("peak memory of %s (fresh process)", row["label"])
            spec = row.get("kernels_of", row["label"])  # a kernel copy: its source, compressed in that process
            row.update(peak_memory(spec, str(device), args.dtype, config, kernels="kernels_of" in row))
    if output is not None:
        from .atomic import write_text_atomically
        from .cli import _finite

        write_text_atomically(output, json.dumps(_finite(out), indent=2, default=str) + "\n")
        log.info("wrote %s", output)
    out["summary"] = table(out)
    return out


def _json_output(path: str) -> Path:
    """``bench --output FILE``, checked before anything is measured: its directory must exist."""
    from .errors import OutputError

    out = Path(path).expanduser()
    if out.is_dir():
        raise OutputError(f"--output {out} is a directory; give a file name, e.g. {out / 'prunekit_bench.json'}")
    if not out.parent.is_dir():
        raise OutputError(f"cannot write {out}: its directory {out.parent} does not exist; create it first")
    return out


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    """``report RUN_DIR``: one self-contained HTML page about a saved result, and its charts as PNGs."""
    from .report import write_report_files

    page, pngs = write_report_files(args.run_dir, args.output, args.bench)
    log.info("wrote %s", page)
    return {"output": str(page), "pngs": [str(p) for p in pngs]}


def cmd_list(args: argparse.Namespace) -> dict[str, Any]:
    """``list [KIND] [PATTERN]``: every entry with its description, defaults and paper."""
    from .registry import entries, format_entries

    found = entries(args.kind, args.pattern)
    if not args.json:
        print(format_entries(found) or f"no entries match {args.pattern!r}" + (f" in {args.kind}" if args.kind else ""))
    return {kind: {e.name: {"description": e.description, "defaults": e.defaults, "paper": e.paper} for e in infos}
            for kind, infos in found.items()}


def _delta_summary(report: dict[str, Any]) -> str:
    """A few lines a person reads after ``delta`` / ``merge`` (``--json`` has everything)."""
    what = {"delta": f"delta {report['method']} drop {report.get('drop')}", "apply": "compact delta applied",
            "merge": f"merge {report.get('method')} of {len(report.get('finetuned') or [])} fine-tunes"}[report["command"]]
    lines = [f"{what}: {report['tensors_pruned']} of {report['tensors_total']} tensors pruned "
             f"({report['params_pruned'] / 1e6:.2f}M of {report['params_total'] / 1e6:.2f}M entries)"]
    if report["command"] != "apply":
        lines.append(f"kept {100 * report['kept_fraction']:.2f}% of the pruned tensors' delta entries")
    lines.append(f"wrote {report['bytes_written'] / 2**20:.1f} MB ({report['format']}) to {report['output']}")
    lines.append(f"seconds {report['seconds']:.1f}; peak memory {report['peak_memory_mb']:,.0f} MB "
                 f"(largest tensor {report['largest_tensor_mb']:.1f} MB)")
    return "\n".join(lines)


def _selection(args: argparse.Namespace) -> Any:
    from .delta import Selection

    return Selection(args.include, args.exclude)


def cmd_delta(args: argparse.Namespace) -> dict[str, Any]:
    """``delta BASE FINETUNED``: base + pruned delta (or ``--compact``: the delta only);
    ``--apply``: FINETUNED is a compact delta to put back onto BASE."""
    from .delta import DeltaConfig, apply_delta, prune_delta
    from .errors import ConfigError

    if args.apply:
        given = [f for f, v in (("--method", args.method), ("--drop", args.drop), ("--q", args.q),
                                ("--compact", args.compact), ("--include", args.include),
                                ("--exclude", args.exclude)) if v not in (None, False)]
        if given:
            raise ConfigError(f"--apply writes what the compact delta records; drop {', '.join(given)}")
        result = apply_delta(args.finetuned, args.base, output=args.output, overwrite=args.overwrite,
                             progress=not args.quiet)
    else:
        config = DeltaConfig(args.method or "dare", 0.9 if args.drop is None else args.drop, args.q, args.seed,
                             _selection(args))
        result = prune_delta(args.base, args.finetuned, config, output=args.output, compact=args.compact,
                             overwrite=args.overwrite, progress=not args.quiet)
    return {**result.report, "summary": _delta_summary(result.report)}


def cmd_merge(args: argparse.Namespace) -> dict[str, Any]:
    """``merge BASE FT1 FT2 ...``: one model from several fine-tunes of BASE."""
    from .delta import MergeConfig, merge

    config = MergeConfig(args.method, tuple(args.weights) if args.weights else None, args.drop, args.scale,
                         args.seed, _selection(args))
    result = merge(args.base, args.finetuned, config, output=args.output, overwrite=args.overwrite,
                   progress=not args.quiet)
    return {**result.report, "summary": _delta_summary(result.report)}
