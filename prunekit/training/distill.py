"""Knowledge distillation from the unpruned teacher (Hinton et al. 2015, "Distilling the
Knowledge in a Neural Network"; for pruned LLMs, Minitron: Muralidharan et al. 2024 and
Sreenivas et al. 2024, who find logit KL alone recovers best, with intermediate-state
matching helping when depth is pruned).

- :func:`kl_loss`: ``T^2 * KL(p_teacher || p_student)`` per token, both at temperature ``T``.
- :func:`hidden_loss`: mean squared distance of matched hidden states, each layer's divided by
  the teacher's mean square (scale-free across layers).
- :func:`layer_map`: which teacher layer each student layer is matched to.
- :class:`Distiller`: the resumable loop (AdamW over the given parameters, masks re-applied
  after every step, a checkpoint every ``checkpoint_every`` steps).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "prunekit_distill_state.pt"


@dataclass(frozen=True)
class Distillation:
    """The distillation loss: ``kl * KL + lm * cross-entropy + hidden * hidden-state MSE``.

    ``temperature``: softens both distributions (the KL is scaled by ``T^2`` so gradients keep
    their size). ``teacher``: a MODEL spec; None distils from the model as it was when the
    recipe started (before any stage pruned it). ``text``: a text spec to distil on; None uses
    the recipe's calibration windows.
    """

    kl: float = 1.0
    lm: float = 0.0
    hidden: float = 0.0
    temperature: float = 1.0
    teacher: str | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        for name in ("kl", "lm", "hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"recovery: distill {name} weight must be a number >= 0, got {v!r}")
        if not self.kl + self.lm + self.hidden > 0:
            raise ConfigError("recovery: distill has every loss weight at 0; give kl, lm or hidden > 0")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise ConfigError(f"recovery: distill temperature must be > 0, got {self.temperature!r}")


def kl_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over tokens of ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``.

    ``student``, ``teacher``: logits ``(..., vocab)``; computed in float32.
    """
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)  # (..., V)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)  # (..., V)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)  # (...)
    return per_token.mean() * t * t


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher index of each student hidden state ``0..student_layers`` (the embeddings'
    output and every block's): evenly spaced, ends aligned (``0 -> 0``, last -> last)."""
    if student_layers < 1 or teacher_layers < student_layers:
        raise ConfigError(f"hidden-state matching needs a teacher with at least as many layers as the student "
                          f"({teacher_layers} < {student_layers})")
    return [round(j * teacher_layers / student_layers) for j in range(student_layers + 1)]


def hidden_loss(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...]) -> Tensor:
    """Mean over matched layers of ``mean((h_s - h_t)^2) / mean(h_t^2)``; hidden states
    ``(B, T, d)`` from ``output_hidden_states=True`` (embeddings first)."""
    index = layer_map(len(student) - 1, len(teacher) - 1)
    terms = []
    for hs, j in zip(student, index):
        ht = teacher[j]
        if hs.shape != ht.shape:
            raise ConfigError(f"hidden-state matching compares states of the same width; the student's are "
                              f"{tuple(hs.shape)} and the teacher's {tuple(ht.shape)} (width or SliceGPT pruning "
                              "changes the width): set distill hidden: 0")
        ht = ht.float()
        terms.append((hs.float() - ht).pow(2).mean() / ht.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


def _forward(model: nn.Module, ids: Tensor, hidden: bool) -> Any:
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if hidden:
        kwargs["output_hidden_states"] = True
    return model(**kwargs)


def distill_losses(student: nn.Module, teacher: nn.Module, ids: Tensor, d: Distillation) -> dict[str, Tensor]:
    """Every loss term on one batch of token windows ``ids (B, T)``, and their weighted sum."""
    out = _forward(student, ids, d.hidden > 0)
    with torch.no_grad():
        ref = _forward(teacher, ids.to(next(teacher.parameters()).device), d.hidden > 0)
    logits = out.logits  # (B, T, V)
    terms: dict[str, Tensor] = {}
    if d.kl > 0:
        if ref.logits.shape[-1] != logits.shape[-1]:
            raise ConfigError(f"the teacher's vocabulary ({ref.logits.shape[-1]}) differs from the student's "
                              f"({logits.shape[-1]}); distil from a teacher of the same tokenizer")
        terms["kl"] = kl_loss(logits, ref.logits.to(logits.device), d.temperature)
    if d.lm > 0:
        terms["lm"] = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    if d.hidden > 0:
        terms["hidden"] = hidden_loss(out.hidden_states, tuple(h.to(logits.device) for h in ref.hidden_states))
    weights = {"kl": d.kl, "lm": d.lm, "hidden": d.hidden}
    terms["loss"] = sum(weights[k] * v for k, v in terms.items())
    return terms


def fingerprint(config: Mapping[str, Any], params: Mapping[str, Tensor]) -> str:
    """What a checkpoint must match to resume: the stage's settings (all but the step count)
    and the name, shape and dtype of every trained tensor."""
    body = json.dumps({"config": config, "params": [(n, list(p.shape), str(p.dtype)) for n, p in params.items()]},
                      sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


class Distiller:
    """AdamW over ``params`` (name -> parameter) for ``steps`` steps on ``batches`` (cycled in
    order), minimising ``loss(batch)["loss"]``; ``after_step()`` runs after each
    optimizer step (masks re-applied there). With ``checkpoint`` (a directory), the trained
    tensors, the optimizer and the losses are saved atomically every ``every`` steps and at
    the end, and a run with the same fingerprint resumes from the last one."""

    def __init__(self, params: Mapping[str, nn.Parameter], lr: float, checkpoint: str | None, every: int,
                 key: str) -> None:
        self.params = dict(params)
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=lr, weight_decay=0.0)
        self.path = Path(checkpoint) / CHECKPOINT_FILE if checkpoint else None
        self.every = every
        self.key = key
        self.curve: dict[str, list[float]] = {"step": []}
        self.start = 0

    def resume(self) -> int:
        """Load the checkpoint if there is one for this run; the step it reached (0 if none)."""
        if self.path is None or not self.path.exists():
            return 0
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise ConfigError(f"cannot read the distillation checkpoint {self.path} ({type(exc).__name__}: {exc}); "
                              "delete it to start over") from None
        if state.get("key") != self.key:
            raise ConfigError(f"the distillation checkpoint {self.path} belongs to another run (other settings or "
                              "model shapes); point checkpoint at a new directory or delete it to start over")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["params"][name].to(p.device))
        self.opt.load_state_dict(state["optimizer"])
        self.curve = state["curve"]
        self.start = int(state["step"])
        log.info("resuming distillation from step %d (%s)", self.start, self.path)
        return self.start

    def save(self, step: int) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"key": self.key, "step": step, "curve": self.curve, "optimizer": self.opt.state_dict(),
                 "params": {n: p.detach().cpu() for n, p in self.params.items()}}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def run(self, model: nn.Module, batches: list[Any], steps: int, loss: Callable[[Any], dict[str, Tensor]],
            after_step: Callable[[], None], progress: bool, desc: str) -> dict[str, list[float]]:
        start = self.resume()
        if start >= steps:
            return self.curve
        was = model.training
        model.train()
        cycle = itertools.islice(itertools.cycle(batches), start, None)  # the batch order of an unbroken run
        bar = tqdm(range(start, steps), desc=desc, disable=not progress, leave=False, initial=start, total=steps)
        try:
            for step in bar:
                terms = loss(next(cycle))
                total = terms["loss"]
                if not torch.isfinite(total):
                    raise ConfigError(f"{desc}: the loss became {float(total.detach())} at step {step + 1}; lower lr")
                total.backward()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                after_step()
                self.curve["step"].append(step + 1)
                for k, v in terms.items():
                    self.curve.setdefault(k, []).append(round(float(v.detach()), 6))
                bar.set_postfix(loss=f"{float(total.detach()):.4f}")
                if (step + 1) % self.every == 0 or step + 1 == steps:
                    self.save(step + 1)
        finally:
            model.train(was)
        return self.curve


__all__ = ["Distillation", "kl_loss", "hidden_loss", "layer_map", "distill_losses", "fingerprint", "Distiller",
           "CHECKPOINT_FILE"]
