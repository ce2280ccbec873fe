"""The two recipe stages that train: gradual pruning while fine-tuning, and recovery of a
pruned model with its masks kept. Both train on the recipe's calibration batches (the loss
:class:`~prunekit.calibration.CalibrationData` knows: next-token cross-entropy for text),
cycling through them for ``steps`` optimizer steps."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import ConfigError
from .rounding import count

log = logging.getLogger(__name__)


def _positive(where: str, **values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ConfigError(f"{where}: {name} must be a positive number, got {v!r}")


@dataclass(frozen=True)
class TrainingStage:
    """Gradual pruning while fine-tuning (Zhu & Gupta 2017): the cubic schedule from 0 to
    ``sparsity`` over the first ``prune_fraction`` of ``steps``, every ``frequency`` steps,
    with masks kept through every optimizer step (:class:`~prunekit.training.SparsityController`).
    ``lr``: AdamW learning rate. ``pattern``/``allocation``: as in the weights stage."""

    sparsity: float = 0.5
    steps: int = 100
    frequency: int = 10
    prune_fraction: float = 0.75
    lr: float = 1e-5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    ignore: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        from .allocation import ALLOCATIONS

        object.__setattr__(self, "ignore", tuple([self.ignore] if isinstance(self.ignore, str) else self.ignore))
        _positive("training", steps=self.steps, frequency=self.frequency, lr=self.lr)
        if not 0 < self.prune_fraction <= 1:
            raise ConfigError(f"training: prune_fraction {self.prune_fraction} must be in (0, 1]")
        ALLOCATIONS.get(self.allocation)
        self.schedule()  # validates sparsity and pattern together

    def schedule(self, pattern: Any = None) -> Any:
        from .config import Pattern
        from .schedules import Gradual

        end = max(1, count(self.prune_fraction, self.steps))
        return Gradual(target=self.sparsity, start=0, end=end, frequency=self.frequency, allocation=self.allocation,
                       pattern=pattern or Pattern.parse(self.pattern))


RECOVERY_METHODS = ("bias_norm", "lora", "full", "peft")


@dataclass(frozen=True)
class RecoveryStage:
    """Recovery of a pruned model, every weight that is zero before staying zero. What trains
    (``method``): ``bias_norm`` only biases and normalisation parameters, ``lora`` masked LoRA
    adapters of ``rank`` merged at the end (PERP, Zimmer et al. 2023), ``full`` every parameter
    (zeros re-applied after each step), ``peft`` LoRA through peft (merged, zeros re-applied).
    The loss: next-token cross-entropy on the calibration windows, or with ``distill`` the
    distillation loss against the unpruned teacher (:class:`~prunekit.training.distill.Distillation`).
    ``steps`` AdamW steps at ``lr``; ``checkpoint``: a directory where the run saves its state
    every ``checkpoint_every`` steps and resumes from."""

    method: str = "bias_norm"
    steps: int = 50
    lr: float = 1e-4
    rank: int = 8
    distill: Any = None
    checkpoint: str | None = None
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        from .training.distill import Distillation

        if self.method not in RECOVERY_METHODS:
            raise ConfigError(f"recovery: unknown method {self.method!r}; use one of {', '.join(RECOVERY_METHODS)}")
        _positive("recovery", steps=self.steps, lr=self.lr, rank=self.rank, checkpoint_every=self.checkpoint_every)
        d = self.distill
        if d is True:
            d = Distillation()
        elif d is False:
            d = None
        elif isinstance(d, dict):
            known = set(Distillation.__dataclass_fields__)
            if set(d) - known:
                raise ConfigError(f"recovery: unknown distill keys {sorted(set(d) - known)}; known: {sorted(known)}")
            d = Distillation(**d)
        elif d is not None and not isinstance(d, Distillation):
            raise ConfigError(f"recovery: distill takes a mapping (e.g. {{kl: 1.0, lm: 0.0}}) or true, got {d!r}")
        object.__setattr__(self, "distill", d)
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            object.__setattr__(self, "checkpoint", str(self.checkpoint))

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        out = {f: getattr(self, f) for f in ("method", "steps", "lr", "rank")}
        if self.distill is not None:
            out["distill"] = asdict(self.distill)
        if self.checkpoint is not None:
            out.update(checkpoint=self.checkpoint, checkpoint_every=self.checkpoint_every)
        return out

    def resume_key(self) -> dict[str, Any]:
        """The settings a checkpoint must share to be resumed (all but the step count)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("steps", "checkpoint", "checkpoint_every")}


def _train(model: nn.Module, params: list[nn.Parameter], data: Any, steps: int, lr: float, after_step: Any,
           progress: bool, desc: str) -> list[float]:
    """AdamW over ``params`` for ``steps`` steps cycling through ``data``'s batches; losses."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        batches = itertools.cycle(data.batches)
        for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            loss = data.loss(model, next(batches))
            if not torch.isfinite(loss):
                raise ConfigError(f"{desc}: the loss became {float(loss.detach())}; lower lr")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step(opt)
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
    return losses


def run_training(stage: TrainingStage, model: nn.Module, data: Any, progress: bool) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data`` while pruning it gradually; the masks become permanent."""
    from .training import SparsityController

    for p in model.parameters():
        p.requires_grad_(True)
    opt_params = [p for p in model.parameters()]
    controller: list[Any] = []

    def after_step(opt: torch.optim.Optimizer) -> None:
        if not controller:
            controller.append(SparsityController(model, opt, stage.schedule(), ignore=stage.ignore, seed=stage.seed))
        controller[0].step()

    # the controller needs the optimizer, which _train creates: attach on the first step
    losses = _train(model, opt_params, data, stage.steps, stage.lr, after_step, progress, "training (gradual)")
    ctrl = controller[0]
    sparsity = ctrl.sparsity()
    ctrl.make_permanent()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"loss_first": losses[0], "loss_last": losses[-1], "trained_sparsity": sparsity,
            "target_sparsity": stage.sparsity}


def run_recovery(stage: RecoveryStage, model: nn.Module, data: Any, progress: bool, teacher: nn.Module | None = None,
                 ) -> dict[str, Any]:
    """Recover ``model`` on ``data`` (distilling from ``teacher`` when the stage says so);
    every weight that is zero before stays zero."""
    from .masking import prunable_parameters
    from .training.distill import Distiller, distill_losses, fingerprint

    if data is None:
        raise ConfigError("recovery trains on calibration data: pass --calib TEXT or data=...")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    masks = {n: p.detach() == 0 for n, p in prunable_parameters(model).items()}
    # all-zero tensors stand for removed structure (the zero biases a config's bias switch needs)
    masks.update({n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if not p.any()})
    masks = {n: m for n, m in masks.items() if m.any()}
    target = _trainable(stage, model, masks)
    params = {n: p for n, p in target.named_parameters() if p.requires_grad}
    live = dict(model.named_parameters()) if stage.method in ("full", "bias_norm") else {}

    @torch.no_grad()
    def after_step() -> None:
        for name, mask in masks.items():  # zeros stay zeros (LoRA and peft cannot touch them)
            if name in live:
                live[name].masked_fill_(mask, 0)

    if stage.distill is not None:
        if teacher is None:
            raise ConfigError("recovery: distill needs a teacher (the recipe keeps the unpruned model as one)")
        if data.kind != "tokens":
            raise ConfigError(f"recovery: distillation runs on token windows of a language model, not {data.kind} "
                              "data")
        teacher.eval()

        def loss(batch: Any) -> dict[str, Tensor]:
            return distill_losses(target, teacher, data.prepared(target, batch).kwargs["input_ids"], stage.distill)
    else:
        def loss(batch: Any) -> dict[str, Tensor]:
            return {"loss": data.loss(target, batch)}

    desc = f"recovery ({stage.method}{', distill' if stage.distill else ''})"
    run = Distiller(params, stage.lr, stage.checkpoint, stage.checkpoint_every, fingerprint(stage.resume_key(), params))
    curve = run.run(target, list(data.batches), stage.steps, loss, after_step, progress, desc)
    resumed = run.start
    _finish(stage, model, target, masks)
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, False))
    with torch.no_grad():  # zeros stay zeros (bias_norm never touches weights; LoRA merges masked)
        for name, p in model.named_parameters():
            if name in masks and masks[name].shape == p.shape:
                p.masked_fill_(masks[name], 0)
    out = {"loss_first": curve["loss"][0], "loss_last": curve["loss"][-1], "method": stage.method,
           "steps": stage.steps, "loss_curve": _thin(curve), "distill": stage.distill is not None}
    if resumed:
        out["resumed_from_step"] = resumed
    return out


def _trainable(stage: RecoveryStage, model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """Set what trains; the module to train (a peft wrapper for ``peft``)."""
    from .training.recovery import add_masked_lora, add_peft_lora, bias_norm_parameters

    for p in model.parameters():
        p.requires_grad_(False)
    if stage.method == "bias_norm":
        bias_norm_parameters(model)
    elif stage.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif stage.method == "lora":
        from .masking import prunable_parameters

        linear = {n: p.detach() == 0 for n, p in prunable_parameters(model).items()
                  if isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.Linear)}
        add_masked_lora(model, linear, rank=stage.rank)
    else:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, nn.Linear) and m is not _head(model)})
        return add_peft_lora(model, names, rank=stage.rank)
    return model


def _head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _finish(stage: RecoveryStage, model: nn.Module, target: nn.Module, masks: dict[str, Tensor]) -> None:
    from .training.recovery import merge_masked_lora, merge_peft_lora

    if stage.method == "lora":
        merge_masked_lora(model)
    elif stage.method == "peft":
        merged = merge_peft_lora(target, masks)
        if merged is not model:  # peft injects into the model it wraps; unwrap must give it back
            raise ConfigError("peft returned a different model after merging; use method lora (masked LoRA)")


def _thin(curve: dict[str, list[float]], most: int = 500) -> dict[str, list[float]]:
    """At most ``most`` points of every series (every k-th step, the last kept)."""
    n = len(curve["step"])
    if n <= most:
        return curve
    keep = sorted(set(range(0, n, -(-n // most))) | {n - 1})
    return {k: [v[i] for i in keep] for k, v in curve.items()}


__all__ = ["TrainingStage", "RecoveryStage", "run_training", "run_recovery"]
