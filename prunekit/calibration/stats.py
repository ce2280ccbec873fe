"""Running statistics of layer inputs, accumulated in float32 whatever the model dtype."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import CalibrationError


def add_gram(gram: Tensor, x: Tensor, part: int = 384) -> None:
    """gram += x^T x for x (tokens, in), computing only blocks on and above the diagonal and
    mirroring them: with p parts, p(p+1)/2 of the p^2 block products (5/8 of the FLOPs for
    in=1536). Columns are split into parts of about ``part`` so each product stays large."""
    n = x.shape[1]
    p = max(1, round(n / part))
    if p == 1:
        gram += x.t() @ x
        return
    bounds = [n * i // p for i in range(p + 1)]
    cols = [x[:, bounds[i] : bounds[i + 1]] for i in range(p)]
    for i in range(p):
        r = slice(bounds[i], bounds[i + 1])
        for j in range(i, p):
            c = slice(bounds[j], bounds[j + 1])
            block = cols[i].t() @ cols[j]  # (in_i, in_j)
            gram[r, c] += block
            if j != i:
                gram[c, r] += block.t()


class InputStats:
    """Sum of squares per input feature, or the full Gram matrix X^T X when a Hessian is needed
    (its diagonal gives the squares for free)."""

    def __init__(self, dim: int, hessian: bool, device: torch.device) -> None:
        self.dim = dim
        self.tokens = 0
        self.gram = torch.zeros(dim, dim, device=device) if hessian else None  # (in, in)
        self.sq = None if hessian else torch.zeros(dim, device=device)  # (in,)
        self._factor: tuple[float, Tensor, Tensor] | None = None

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, self.dim).float()  # (tokens, in)
        self.tokens += x.shape[0]
        if self.gram is not None:
            add_gram(self.gram, x)
        else:
            self.sq.add_(torch.linalg.vector_norm(x, dim=0).square())  # no (tokens, in) temporary

    def _squares(self) -> Tensor:
        return self.gram.diagonal() if self.gram is not None else self.sq

    def check_finite(self, where: str) -> None:
        if not torch.isfinite(self._squares()).all():
            raise CalibrationError(
                f"NaN/Inf activations reach {where}: the model overflows on the calibration data; "
                "load it in float32 (the default) or check its weights"
            )

    @property
    def input_norm(self) -> Tensor:
        """(in,) L2 norm of each input feature over all tokens."""
        return self._squares().clamp_min(0).sqrt()

    @property
    def hessian(self) -> Tensor | None:
        """(in, in) X^T X / n, or None when only norms were collected."""
        return None if self.gram is None else self.gram / max(self.tokens, 1)

    def inverse_factor(self, damp: float) -> tuple[Tensor, Tensor]:
        """Upper Cholesky factor of the damped inverse Hessian and the dead-input mask,
        computed once and shared by every layer reading this input (q/k/v, gate/up)."""
        from ..reconstruct.hessian import inverse_cholesky_upper

        if self.gram is None:
            raise CalibrationError("an inverse Hessian was asked of statistics collected without one")
        if self._factor is None or self._factor[0] != damp:
            self._factor = (damp, *inverse_cholesky_upper(self.hessian, damp))
        return self._factor[1], self._factor[2]


class _StopBlock(Exception):
    """Raised to skip the rest of a block once every hooked layer has seen its input."""


@dataclass
class StatGroup:
    """Layers that read the very same input tensor, and that input's statistics."""

    names: list[str]
    stats: InputStats


@dataclass
class StatsCollector:
    """Forward pre-hooks on a block's target layers. Layers fed the same tensor object (q/k/v,
    gate/up) share one ``InputStats``, so each statistic is computed once per distinct input.
    With ``stop_early``, later batches stop the block right after the last hooked layer."""

    layers: dict[str, nn.Module]
    hessian: bool
    stop_early: bool = True
    groups: list[StatGroup] = field(default_factory=list)
    _leader: dict[str, int] = field(default_factory=dict)
    _order: list[str] = field(default_factory=list)
    _seen: list[tuple[Tensor, int]] = field(default_factory=list)
    _batches: int = 0
    _calls: int = 0

    def _hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self._batches == 0:
                self._order.append(name)
                shared = next((g for t, g in self._seen if t is x), None)
                if shared is not None:
                    self.groups[shared].names.append(name)
                    return
                self.groups.append(StatGroup([name], InputStats(x.shape[-1], self.hessian, x.device)))
                self._leader[name] = len(self.groups) - 1
                self._seen.append((x, len(self.groups) - 1))
            if name in self._leader:
                self.groups[self._leader[name]].stats.add(x.detach())
            self._calls += 1
            if self.stop_early and self._batches > 0 and self._calls == len(self._order):
                raise _StopBlock

        return pre_hook

    def __enter__(self) -> StatsCollector:
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def end_batch(self) -> None:
        self._batches += 1
        self._calls = 0
        self._seen.clear()  # drop references to the first batch's activations

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
