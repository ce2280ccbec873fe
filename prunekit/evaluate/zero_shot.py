"""Zero-shot (and few-shot) accuracy through EleutherAI's lm-evaluation-harness.

Wanda (Sun et al. 2023) and the pruning papers that follow its protocol report zero-shot
accuracy on seven multiple-choice tasks (:data:`PAPER_TASKS`), scored by log-likelihood: each
choice is appended to the question (after the task's ``target_delimiter``, a space by default),
the log-probabilities of the choice's tokens are summed, and the argmax is the model's answer.
``acc_norm`` divides each sum by the choice's length in characters first (``acc_bytes``, when
a task asks for it, by its UTF-8 bytes).

This module only bridges: the model stays the caller's in-memory ``PreTrainedModel`` (pruned
weights, masks and all), wrapped in lm-eval's ``HFLM``; lm-eval builds the requests, runs
them and aggregates. It is an optional dependency (``pip install lm-eval``), imported only
when :func:`zero_shot` runs.

Offline, lm-eval's own tasks cannot download their datasets (they come from the Hugging Face
hub; a copy already in the HF datasets cache is used); a local task (a YAML file over JSON/CSV
files, in a directory given as ``include_path``) always works.
"""
from __future__ import annotations

import copy
import difflib
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..errors import ConfigError, DataError, PrunekitError

log = logging.getLogger(__name__)

#: the task list of the pruning papers' zero-shot tables (``--tasks paper``)
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

#: the metrics a result keeps (with their ``_stderr``), when the task reports them
METRICS = ("acc", "acc_norm", "acc_bytes", "exact_match", "f1", "mcc")

_WHERE_TASKS_COME_FROM = ("tasks are lm-eval's own (`lm-eval ls tasks` lists them) or local YAML tasks in a "
                          "directory given with --include-path DIR (include_path= from Python)")


def task_names(tasks: str | Sequence[str]) -> list[str]:
    """The task names of a comma-separated string or a list, with ``paper`` expanded to
    :data:`PAPER_TASKS`, duplicates dropped (first occurrence kept)."""
    items = tasks.split(",") if isinstance(tasks, str) else [t for item in tasks for t in str(item).split(",")]
    names: list[str] = []
    for item in (t.strip() for t in items):
        for name in PAPER_TASKS if item == "paper" else (item,) if item else ():
            if name not in names:
                names.append(name)
    if not names:
        raise ConfigError(f"no task names in {tasks!r}; give e.g. 'boolq,rte' or 'paper' ({', '.join(PAPER_TASKS)})")
    return names


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise PrunekitError(f"zero-shot accuracy needs lm-eval-harness ({exc}); install it with `pip install lm-eval` "
                            "(or `pip install 'prunekit[eval]'`)") from None
    return lm_eval, HFLM, TaskManager


def _is_offline(exc: BaseException) -> bool:
    """Whether a failure to build a task is a dataset that could not be fetched (no network,
    hub unreachable, offline mode), judged over the exception and its causes."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {cls.__name__ for cls in type(exc).__mro__}
        if names & {"ConnectionError", "ConnectError", "LocalEntryNotFoundError", "OfflineModeIsEnabled",
                    "TimeoutError", "TimeoutException", "Timeout", "NameResolutionError", "MaxRetryError"}:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _task_manager(TaskManager: Any, names: list[str], include_path: str | Path | None) -> Any:
    """A TaskManager that knows ``names``. Indexing lm-eval's ~15,000 built-in tasks takes
    seconds, so when every name is a local task the built-in index is skipped."""
    if include_path is not None:
        path = Path(include_path)
        if not path.is_dir():
            raise ConfigError(f"include_path {str(path)!r} is not a directory; give the directory that holds "
                              "the task YAML files")
        local = TaskManager(include_path=str(path), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
        return TaskManager(include_path=str(path))
    return TaskManager()


def _load_tasks(manager: Any, names: list[str], include_path: str | Path | None) -> list[Any]:
    """Build each task (lm-eval loads its dataset here) and return the objects to evaluate;
    an unknown name or an unreachable dataset is an error naming the task."""
    known = manager.all_tasks
    objects: list[Any] = []
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" (searched lm-eval's tasks and {include_path})" if include_path is not None else ""
            raise ConfigError(f"unknown lm-eval task {name!r}{where}{hint}; {_WHERE_TASKS_COME_FROM}")
        try:
            loaded = manager.load([name])
        except Exception as exc:  # lm-eval and datasets raise many types; the offline ones are told apart
            if _is_offline(exc):
                raise DataError(f"task {name!r}: its dataset could not be downloaded (offline? {exc}). lm-eval's "
                                "tasks load their data from the Hugging Face hub: run where the hub is reachable (or "
                                "the dataset is in the HF datasets cache), or use a local task over your own files "
                                "with --include-path DIR") from None
            raise DataError(f"task {name!r} could not be loaded: {type(exc).__name__}: {exc}") from exc
        group = loaded.get("groups", {}).get(name)
        objects.extend([group] if group is not None else loaded["tasks"].values())
    return objects


def _lm(HFLM: Any, model: nn.Module, tokenizer: Any, batch_size: int | str, progress: bool) -> Any:
    """lm-eval's HFLM over the in-memory model, with its progress bars switchable."""

    class _PrunekitLM(HFLM):
        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

    # HFLM may give the tokenizer a pad token (even a new one): it works on a copy
    return _PrunekitLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)


def _plain(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" for a stderr it could not compute
        return None


def summarise(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{task: {metric: float, metric_stderr: float, n_examples: int}}`` from lm-eval's
    results: the metrics of :data:`METRICS` a task reports (``acc,none`` -> ``acc``; a filter
    other than ``none`` keeps its name: ``exact_match,strict``) and the examples evaluated."""
    counts = results.get("n-samples", {})
    out: dict[str, dict[str, Any]] = {}
    for task, row in results.get("results", {}).items():
        metrics: dict[str, Any] = {}
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            base = metric.removesuffix("_stderr")
            if base in METRICS:
                metrics[metric if filt in ("none", "") else f"{metric},{filt}"] = _plain(value)
        if task in counts:
            metrics["n_examples"] = int(counts[task].get("effective", counts[task].get("original", 0)))
        out[task] = metrics
    return out


def zero_shot(model: nn.Module, tokenizer: Any, tasks: str | Sequence[str], *, include_path: str | Path | None = None,
              limit: int | float | None = None, num_fewshot: int = 0, batch_size: int | str = 1,
              device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Accuracy of an in-memory causal LM on lm-eval-harness tasks.

    ``tasks``: names (a list or ``"boolq,rte"``; ``paper`` is :data:`PAPER_TASKS`), lm-eval's
    own or local YAML tasks in ``include_path``. ``limit``: at most this many examples per task
    (a fraction if < 1). ``num_fewshot``: examples put before each question (0: zero-shot; it
    overrides a task's default, except that a task whose YAML sets 0 stays zero-shot).
    ``device``: move the model there first (default: where it is). The model is evaluated as it
    is, in its dtype, and left in its train/eval mode. Returns ``{"tasks": {task: {"acc": float,
    "acc_stderr": float, "acc_norm": ..., "n_examples": int}}, "lm_eval_version": str,
    "num_fewshot": int, "limit": ..., "seconds": float}``.
    """
    names = task_names(tasks)
    if limit is not None and not limit > 0:
        raise ConfigError(f"limit must be > 0 (examples per task, or a fraction below 1), got {limit}")
    if num_fewshot < 0:
        raise ConfigError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if tokenizer is None:
        raise ConfigError("zero-shot accuracy needs the model's tokenizer; the model was loaded without one")
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ConfigError(f"zero-shot accuracy runs lm-eval on a Hugging Face language model (a transformers "
                          f"PreTrainedModel); got {type(model).__name__}")
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    from lm_eval import simple_evaluate

    t0 = time.perf_counter()
    if device is not None:
        model.to(device)
    manager = _task_manager(TaskManager, names, include_path)
    objects = _load_tasks(manager, names, include_path)
    was_training = model.training
    try:
        lm = _lm(HFLM, model, tokenizer, batch_size, progress)
        # the global random seeds stay the caller's (None); few-shot sampling has its own seed
        results = simple_evaluate(model=lm, tasks=objects, task_manager=manager, num_fewshot=num_fewshot,
                                  limit=limit, log_samples=False, random_seed=None, numpy_random_seed=None,
                                  torch_random_seed=None, fewshot_random_seed=1234)
    finally:
        model.train(was_training)
    if results is None:  # pragma: no cover - only on a non-zero rank of a distributed launch
        raise PrunekitError("lm-eval returned no results (not the first rank of a distributed run?)")
    out = {"tasks": summarise(results), "lm_eval_version": lm_eval.__version__, "num_fewshot": num_fewshot,
           "limit": limit, "seconds": time.perf_counter() - t0}
    for task, row in out["tasks"].items():
        log.info("%s: %s", task, ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k in ("acc", "acc_norm")))
    return out


def require_lm_eval() -> None:
    """Raise the install hint now if lm-eval is missing (before a long model load)."""
    _import_lm_eval()


def table(result: dict[str, Any]) -> str:
    """A few lines a person reads: one per task with acc, acc_norm and the examples."""
    lines = [f"zero-shot accuracy (lm-eval {result['lm_eval_version']}, {result['num_fewshot']}-shot"
             + (f", limit {result['limit']}" if result.get("limit") is not None else "") + ")",
             f"  {'task':<24} {'acc':>8} {'acc_norm':>9} {'examples':>9}"]
    cell = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for task, row in result["tasks"].items():
        lines.append(f"  {task:<24} {cell(row.get('acc')):>8} {cell(row.get('acc_norm')):>9} "
                     f"{row.get('n_examples', '-'):>9}")
    return "\n".join(lines)
