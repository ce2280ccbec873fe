"""Command line: ``prunekit prune | run | eval | bench | report | delta | merge | list``. With
``--json`` the last stdout line is one JSON object; logs and progress go to stderr. Errors exit with status 2 and write
nothing; Ctrl-C exits with 130."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Any, Sequence

from .errors import PrunekitError

log = logging.getLogger("prunekit")

EPILOG = """MODEL: a local Hugging Face directory (a saved result included), a hub id, a .gguf file,
or 'default' (SmolLM2-135M-Instruct). TEXT: a local text file, 'default' (bundled Python
docstring corpus; disjoint calibration and evaluation parts), or a hub dataset name (wikitext2, c4).
Counts round halves up: a ratio or sparsity r of n units removes floor(r*n + 0.5) of them, per
group (at least 1 must stay), so a 0.25 head ratio on 3 heads removes 1 of 3 (33%) and a ratio
that removes nothing (0.1 on 3 heads) is an error naming the smallest ratio that removes one;
the run prints what it removed beside what was asked. N:M keeps exactly N of every M."""

#: flags that only weight pruning takes, and only structural pruning takes (name -> default)
WEIGHTS_ONLY = {"sparsity": None, "pattern": "unstructured", "owl_m": None, "owl_lambda": None, "blocksize": None,
                "damp": None, "sequential": "layer", "unreached": "magnitude", "offload": "none",
                "refine": "none", "permute": False}
STRUCTURE_ONLY = {"ratio": None, "heads": "auto", "round_to": 1, "latency": False, "override": [], "blocks": None}
#: the budget flags (prune to a size instead of a ratio); the search sets everything else
TARGET_FLAGS = ("target_params", "target_macs", "target_latency")
STRUCTURES = ("channels", "neurons", "heads", "width", "layers", "experts")


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give an integer or 'auto'") from None


def _structures(text: str) -> str:
    """``--structure`` takes one structure, or a comma list (for a --target-* search)."""
    names = [t.strip() for t in text.split(",")]
    bad = [n for n in names if n not in STRUCTURES]
    if bad:
        raise argparse.ArgumentTypeError(f"invalid choice: {bad[0]!r} (choose from {', '.join(STRUCTURES)})")
    return ",".join(names)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit status 2 as every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"prunekit: error: {message} (see '{self.prog} --help')\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", default=None, metavar="DIR",
                   help="directory to save the result in (required unless --dry-run); written atomically, "
                        "before any evaluation starts")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--format", choices=("dense", "compact"), default="dense",
                   help="how the weights are stored: dense (model.safetensors, plain from_pretrained; the default) "
                        "or compact (sparse weights as bitmask + values, N:M as values + positions, reloaded "
                        "bit-exact by prunekit.load; a model packing would shrink by under 1%% is saved dense)")
    p.add_argument("--resume", action="store_true",
                   help="save progress after every block in .DIR.resume/ beside --output (recipes of weights stages, "
                        "one process) and, when the same command runs again after a crash or kill, continue from it: "
                        "the same result, bit for bit; removed once the result is saved")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (which layers or groups lose how much, resulting parameters and MACs) "
                        "and exit without changing or writing anything")
    p.add_argument("--eval", metavar="TEXT", help="also measure perplexity on TEXT: the dense model first (cached "
                                                  "per model, text and windows), then the pruned one")
    p.add_argument("--eval-max-tokens", type=int, default=None, help="evaluate at most this many tokens")


def _calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="default", metavar="TEXT", help="calibration text (default: bundled corpus)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and random scores")


def _prune_parser(sub: Any) -> None:
    p = sub.add_parser("prune", help="prune with one stage (weights, or whole structures) and save the result",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--method", default=None,
                   help="weights: magnitude, random, wanda, sparsegpt, ria or gblm (default wanda); with "
                        "--structure: flap, wanda, taylor, llm_pruner, l2, l1, random, bn_scale (default: flap on "
                        "language models, l2 otherwise); width also slicegpt (PCA rotation, Llama-style "
                        "decoders); layers: block_influence (default), random; experts: frequency (default), "
                        "reap, easy_ep, greedy, router_norm, random")
    p.add_argument("--structure", type=_structures, metavar="{channels,neurons,heads,width,layers,experts}",
                   help="remove whole structures instead of single weights: channels (hidden width on "
                        "transformers), neurons (MLP), heads (attention), layers (blocks), experts (MoE); with a "
                        "--target-*, a comma list of neurons, heads, layers, width to search over, e.g. "
                        "neurons,heads,layers")
    p.add_argument("--target-params", type=int, default=None, metavar="N",
                   help="with --structure: prune to at most N parameters, searching how many neurons, heads and "
                        "blocks to remove (the candidates tried are in the report)")
    p.add_argument("--target-macs", type=int, default=None, metavar="N",
                   help="with --structure: prune to at most N multiply-accumulates per 1x64-token forward")
    p.add_argument("--target-latency", type=float, default=None, metavar="MS",
                   help="with --structure: prune until one calibration window's prefill takes at most MS "
                        "milliseconds on --device (measured)")
    p.add_argument("--candidates", type=int, default=None,
                   help="with a --target-*: how many mixes of the structures to try (default 8)")
    p.add_argument("--ratio", type=float, default=None, help="with --structure: fraction of units removed, in [0, 1) "
                   "(rounded half up per group)")
    p.add_argument("--heads", default=None, choices=["auto", "kv", "query"],
                   help="with --structure heads: remove whole key/value groups (kv), the same number of "
                        "query heads from every group (query), or auto (default: kv where every layer has "
                        "several key/value heads, else query)")
    p.add_argument("--round-to", default=None, type=_round_to,
                   help="with --structure: keep a multiple of this many units; with a --target-*, 'auto' (the "
                        "default there) measures the multiple matmuls run fast at on the device")
    p.add_argument("--blocks", default=None, metavar="START:STOP",
                   help="with --structure neurons or heads: only blocks START..STOP-1 lose units (LLM-Pruner's "
                        "block-wise range, e.g. 4:30)")
    p.add_argument("--latency", action="store_true", default=None,
                   help="with --structure: also time the dense and the pruned model on one calibration window "
                        "(median of interleaved repeats) and report latency_ms_before/after")
    p.add_argument("--override", action="append", default=None, metavar="REGEX=R",
                   help="with --structure: groups whose name matches REGEX lose R of their units instead "
                        "(repeatable; first match wins), e.g. --override 'layers\\.0\\.=0'")
    p.add_argument("--recipe", help="YAML recipe (a saved result's prunekit_recipe.yaml, or any recipe): runs its "
                                    "stages instead of --method and the axis flags")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of weights removed, in [0, 1) (default 0.5)")
    p.add_argument("--pattern", default=None,
                   help="unstructured (each score's own comparison group), unstructured:row, unstructured:layer, "
                        "or N:M like 2:4")
    p.add_argument("--allocation", default=None, help="uniform, global or owl (structures: uniform or global)")
    p.add_argument("--owl-m", type=float, default=None, help="OWL outlier threshold M (default 5)")
    p.add_argument("--owl-lambda", type=float, default=None, help="OWL sparsity spread lambda (default 0.08)")
    _calibration(p)
    p.add_argument("--sequential", default=None, choices=["layer", "block"],
                   help="layer (default): prune each layer just before it runs, from the outputs of the already "
                        "pruned layers, one pass per block (every calibration batch in flight); block: statistics "
                        "from the unpruned block, two passes, one batch in flight (less memory)")
    p.add_argument("--offload", default=None, choices=["none", "cpu", "disk"],
                   help="where block inputs wait between blocks: where blocks compute (none), CPU memory while "
                        "blocks run on a GPU (cpu), or memory-mapped files (disk)")
    p.add_argument("--unreached", default=None, choices=["magnitude", "dense"],
                   help="layers no calibration token reaches (MoE experts nobody routes to): prune them by "
                        "magnitude (default) or leave them dense; the report names them")
    p.add_argument("--blocksize", type=int, default=None, help="SparseGPT lazy-update block size (default 128)")
    p.add_argument("--damp", type=float, default=None, help="SparseGPT dampening, fraction of mean Hessian diagonal "
                                                             "(default 0.01)")
    p.add_argument("--refine", default=None, choices=["none", "dsnot"],
                   help="after the mask is chosen (and SparseGPT's update): none (default), or dsnot, training-free "
                        "swaps of kept and pruned weights that shrink each row's expected error (same sparsity "
                        "and N:M pattern)")
    p.add_argument("--permute", action="store_true", default=None,
                   help="with an N:M pattern: reorder each layer's input channels before forming the groups of M, "
                        "so they keep more score (RIA's channel reallocation, then Pool & Yu's swaps); the weights "
                        "stay in place, the report marks such layers input_permuted and the output saves the orders "
                        "(a 2:4 kernel needs the inputs reordered)")
    p.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="leave layers whose name matches dense (repeatable)")
    _output(p)
    _placement(p)
    _common(p)


DELTA_EPILOG = """BASE, FINETUNED: Hugging Face directories (sharded or not; safetensors or pytorch_model.bin),
single .safetensors files, or hub ids, of the same architecture. Tensors are read and written one
at a time (peak memory: a few tensors). Pruned by default: every 2-D weight inside the blocks
(model.layers.N., transformer.h.N., ...); embeddings, the LM head, norms and biases keep their whole
delta. --include REGEX replaces that rule, --exclude REGEX removes tensors from it. The output is a
standard Hugging Face directory (config and tokenizer of FINETUNED) that from_pretrained loads."""

#: kept in step with prunekit.delta.ops (tests check); the parser must not import torch
DELTA_METHODS = ("dare", "darex", "magnitude", "ties", "drop")
MERGE_METHODS = ("task_arithmetic", "ties", "dare_ties")


def _tensor_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include", metavar="REGEX", help="prune the tensors whose names match (replaces the default)")
    p.add_argument("--exclude", metavar="REGEX", help="never prune the tensors whose names match")
    p.add_argument("--seed", type=int, default=0, help="seed of the random drops (default 0)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="directory to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    _common(p)


def _delta_parsers(sub: Any) -> None:
    d = sub.add_parser("delta", help="prune a fine-tune's difference from its base (DARE, DAREx-q, magnitude, TIES)",
                       epilog=DELTA_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("base", metavar="BASE")
    d.add_argument("finetuned", metavar="FINETUNED", help="the fine-tune; with --apply, a compact delta directory")
    d.add_argument("--method", choices=DELTA_METHODS, default=None,
                   help="dare: random drop, survivors x 1/(1-p) (default); darex: survivors x 1/q; magnitude and "
                        "ties: keep the largest deltas (the same for one model); drop: random, no rescaling")
    d.add_argument("--drop", type=float, default=None, help="fraction of delta entries removed, in [0, 1) (default 0.9)")
    d.add_argument("--q", type=float, default=None, help="darex: survivors are scaled by 1/Q, 1-drop <= Q <= 1")
    d.add_argument("--compact", action="store_true",
                   help="write only the sparse delta (bitmask + values, with the base's checksum), not the model")
    d.add_argument("--apply", action="store_true", help="FINETUNED is a compact delta: write BASE with it applied")
    _tensor_selection(d)

    m = sub.add_parser("merge", help="merge fine-tunes of one base (task arithmetic, TIES, DARE-TIES)",
                       epilog=DELTA_EPILOG.replace("config and tokenizer of FINETUNED", "config and tokenizer of BASE"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("base", metavar="BASE")
    m.add_argument("finetuned", metavar="FINETUNED", nargs="+", help="one or more fine-tunes of BASE")
    m.add_argument("--method", choices=MERGE_METHODS, default="ties",
                   help="task_arithmetic: base + sum of weight x delta; ties: trim each delta by magnitude, elect "
                        "signs, average the agreeing entries; dare_ties: DARE instead of the trim (default ties)")
    m.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                   help="one weight per fine-tune (default 1/k for task_arithmetic, the plain average; 1 for ties and "
                        "dare_ties, whose mean over agreeing models normalises by the weights)")
    m.add_argument("--drop", type=float, default=None,
                   help="fraction of each delta trimmed first (default 0.8 ties, 0.9 dare_ties, 0 task_arithmetic)")
    m.add_argument("--scale", type=float, default=1.0, help="lambda, the factor of the merged delta (default 1)")
    _tensor_selection(m)


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (N examples, or a fraction below 1)") from None
    return int(value) if value >= 1 and value.is_integer() else value


def _zero_shot_flags(p: argparse.ArgumentParser) -> None:
    """``eval``'s lm-eval-harness flags (prunekit.evaluate.zero_shot; needs ``pip install lm-eval``)."""
    p.add_argument("--tasks", default=None, metavar="LIST",
                   help="also measure accuracy on lm-eval-harness tasks, comma-separated (e.g. boolq,rte); 'paper' is "
                        "the pruning papers' seven (boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, "
                        "openbookqa), whose datasets come from the Hugging Face hub (or its cache)")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="with --tasks: a directory of local task YAML files (these run offline)")
    p.add_argument("--limit", type=_limit, default=None, metavar="N",
                   help="with --tasks: at most N examples per task (a fraction if below 1)")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="with --tasks: examples shown before each question (default 0: zero-shot)")
    p.add_argument("--no-perplexity", action="store_true", help="with --tasks: skip the perplexity measurement")


def _report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page (with PNG charts) about a saved result",
                       epilog="RUN_DIR: the --output DIR of `prunekit prune` or `prunekit run`. Optional in it: "
                              "prunekit_eval.json (quality) and prunekit_bench.json (`prunekit bench MODEL RUN_DIR "
                              "--output RUN_DIR/prunekit_bench.json`).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="the HTML file (default RUN_DIR/prunekit_report.html); the charts go beside it as PNGs")
    p.add_argument("--bench", default=None, metavar="FILE",
                   help="a `prunekit bench --json` file (default RUN_DIR/prunekit_bench.json when present)")
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="prunekit", description="Prune PyTorch models.", epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prune,run,eval,bench,report,delta,merge,list}")
    _prune_parser(sub)

    r = sub.add_parser("run", help="run every stage of a YAML recipe on one model and save the result", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("recipe", metavar="RECIPE", help="YAML file: calibration: {...}, stages: [{structure: {...}}, ...]")
    r.add_argument("model", metavar="MODEL")
    r.add_argument("--calib", default=None, metavar="TEXT", help="calibration text (default: the recipe's)")
    _output(r)
    _placement(r)
    _common(r)

    e = sub.add_parser("eval", help="perplexity, sparsity and (--tasks) lm-eval accuracy of a model", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model", metavar="MODEL")
    e.add_argument("--eval", "--text", dest="eval", default="default", metavar="TEXT",
                   help="evaluation text (default: bundled corpus); --text is the older name")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--eval-max-tokens", "--max-tokens", dest="eval_max_tokens", type=int, default=None,
                   help="evaluate at most this many tokens; --max-tokens is the older name")
    _zero_shot_flags(e)
    _placement(e)
    _common(e)

    b = sub.add_parser("bench", help="measured speed and size: a model beside its pruned versions",
                       epilog="Timings are interleaved across the models round by round (medians), so their ratios "
                              "hold on a busy machine; peak memory is measured per model in a fresh process.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("model", metavar="MODEL", help="the baseline (usually the dense model): ratios are against it")
    b.add_argument("pruned", nargs="*", metavar="PRUNED", help="pruned models (saved directories) to compare")
    b.add_argument("--prompt-tokens", type=int, default=128, help="prefill length (default 128)")
    b.add_argument("--decode-tokens", type=int, default=32, help="greedy decode steps timed per batch (default 32)")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 8], metavar="B",
                   help="decode batch sizes (default 1 8)")
    b.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians are reported (default 5)")
    b.add_argument("--layers", action="store_true", help="also time every block of the prefill")
    b.add_argument("--no-peak-memory", action="store_true",
                   help="skip the per-model peak-memory runs (each loads the model again in a fresh process)")
    b.add_argument("--sparse-kernels", choices=["auto", "off", "on"], default="auto",
                   help="also time each pruned model's 2:4 Linear layers through PyTorch's semi-structured kernels "
                        "(CUDA, compute capability >= 8.0, float16/bfloat16): auto where available (default), "
                        "on: an error where not, off: never")
    b.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="also write the JSON object to FILE (atomically), e.g. RUN_DIR/prunekit_bench.json for "
                        "`prunekit report RUN_DIR`")
    _placement(b)
    _common(b)

    _report_parser(sub)
    _delta_parsers(sub)

    ls = sub.add_parser("list", help="list the registries: methods, scores, patterns, allocations, ...")
    ls.add_argument("kind", nargs="?", default=None, help="one registry (e.g. scores, allocations); default: all")
    ls.add_argument("pattern", nargs="?", default="*", help="a name pattern with * wildcards, e.g. 'gl*'")
    ls.add_argument("--json", action="store_true")
    return parser


def check_mode_flags(args: argparse.Namespace) -> None:
    """A flag that does not apply to the chosen mode is an error naming the right flag; then
    the defaults of the mode's own flags are filled in."""
    from .errors import ConfigError

    given = lambda name: getattr(args, name) not in (None, [])  # noqa: E731
    if args.recipe:
        mode_flags = [n for n in (*WEIGHTS_ONLY, *STRUCTURE_ONLY, *TARGET_FLAGS, "candidates", "method", "structure",
                                  "allocation") if given(n)]
        if mode_flags:
            raise ConfigError(f"--recipe replaces the method flags; drop {', '.join(_flag(n) for n in mode_flags)} "
                              "(edit the recipe instead)")
    elif args.structure and any(given(t) for t in TARGET_FLAGS):
        targets = [t for t in TARGET_FLAGS if given(t)]
        if len(targets) > 1:
            raise ConfigError(f"give one budget, not {' and '.join(_flag(t) for t in targets)}")
        wrong = [n for n in (*WEIGHTS_ONLY, "ratio", "override", "blocks", "latency") if given(n)]
        if wrong:
            raise ConfigError(f"{_flag(wrong[0])} does not go with {_flag(targets[0])}: the budget search chooses "
                              "how much of each structure goes; remove it")
        if args.allocation not in (None, "uniform"):
            raise ConfigError("--allocation does not go with a --target-*: the search removes the same number of "
                              "units from every group of a structure")
        if given("candidates") and args.candidates < 1:
            raise ConfigError(f"--candidates must be >= 1, got {args.candidates}")
        if args.round_to is None:
            args.round_to = "auto"
    elif args.structure:
        if "," in args.structure:
            raise ConfigError(f"--structure {args.structure} names several structures: that goes with a budget "
                              "(--target-params N, --target-macs N or --target-latency MS); for a ratio, give one")
        if given("candidates"):
            raise ConfigError("--candidates goes with a --target-* budget")
        if isinstance(args.round_to, str):
            raise ConfigError("--round-to auto goes with a --target-* budget; give an integer")
        wrong = [n for n in WEIGHTS_ONLY if given(n)]
        if "sparsity" in wrong:
            raise ConfigError("--sparsity is for weight pruning; with --structure give --ratio (fraction of units removed)")
        if wrong:
            raise ConfigError(f"{_flag(wrong[0])} is for weight pruning, not --structure; remove it")
        if args.ratio is None:
            raise ConfigError("--structure needs --ratio R, the fraction of units to remove, e.g. --ratio 0.25")
        if args.heads is not None and args.structure != "heads":
            raise ConfigError(f"--heads goes with --structure heads, not --structure {args.structure}")
    else:
        wrong = [n for n in (*STRUCTURE_ONLY, *TARGET_FLAGS, "candidates") if given(n)]
        if "ratio" in wrong:
            raise ConfigError("--ratio goes with --structure; for weight pruning give --sparsity")
        if wrong:
            raise ConfigError(f"{_flag(wrong[0])} goes with --structure (structural pruning); remove it or add --structure")
    for name, default in {**WEIGHTS_ONLY, **STRUCTURE_ONLY, "allocation": "uniform"}.items():
        if getattr(args, name) is None and name != "sparsity" and name != "ratio":
            setattr(args, name, list(default) if isinstance(default, list) else default)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; Ctrl-C at any moment (imports included) exits 130 with one line."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Temporary files were removed on the way out; exit at once, with no interpreter
        # teardown that could wake native threads (no traceback, no C++ terminate).
        print("prunekit: interrupted (no partial output is ever left behind)", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    from . import commands

    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    if args.command in ("prune", "run"):
        from .calibration.distributed import init_from_env

        init_from_env()  # under torchrun: one rank of the group (WORLD_SIZE > 1)
    run = {"prune": commands.cmd_prune, "run": commands.cmd_run, "eval": commands.cmd_eval,
           "bench": commands.cmd_bench, "report": commands.cmd_report,
           "list": commands.cmd_list, "delta": commands.cmd_delta, "merge": commands.cmd_merge}[args.command]
    try:
        out = run(args)
    except PrunekitError as exc:
        print(f"prunekit: error: {exc}", file=sys.stderr)
        return 2
    summary = out.pop("summary", None) if isinstance(out, dict) else None
    from .calibration import distributed

    if distributed.rank() != 0:  # every rank holds the same result; rank 0 alone reports it
        return 0
    if args.json:
        if summary and not quiet:
            print(summary, file=sys.stderr)
        print(json.dumps(_finite(out), default=str))
    elif summary:
        print(summary)
    elif args.command != "list":
        for key, value in out.items():
            if key != "stages":
                print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
