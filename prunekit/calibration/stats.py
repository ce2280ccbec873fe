"""Running statistics of layer inputs, created on the device of the inputs they summarise.

Inputs of any dtype are read in float32. Sums of squares and Gram matrices accumulate in
float32 (as in the Wanda and SparseGPT reference code); feature means and variances merge
per batch in float64 with Chan et al.'s pairwise update ("Updating Formulae and a Pairwise
Algorithm for Computing Sample Variances", 1979), so a feature with mean 3000 and standard
deviation 1 keeps its variance: the naive ``E[x^2] - E[x]^2`` cancels it away in float32.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..errors import CalibrationError


def add_gram(gram: Tensor, x: Tensor, part: int | None = None) -> None:
    """gram += x^T x for x (tokens, in), computing only blocks on and above the diagonal and
    mirroring them: with p parts, p(p+1)/2 of the p^2 block products (5/8 of the FLOPs for
    in=1536). Columns are split into parts of about ``part`` (192 below 1024 inputs, else 384:
    measured fastest on 2 AVX-512 cores) so each product stays large."""
    n = x.shape[1]
    part = part or (192 if n < 1024 else 384)
    p = max(1, round(n / part))
    if p == 1:
        gram.addmm_(x.t(), x)
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


def column_squares(x: Tensor) -> Tensor:
    """(in,) sum over tokens of x**2 for x (tokens, in), as one matrix-vector product
    (reducing over the strided token dim directly is several times slower on CPUs)."""
    return torch.ones(x.shape[0], dtype=x.dtype, device=x.device) @ (x * x)


class InputStats:
    """Statistics of one input feature dimension ``dim`` over all calibration tokens.

    Always the sum of squares (Wanda's ``||x_j||``); with ``gram`` the full ``X^T X`` (its
    diagonal is the sum of squares); with ``moments`` the float64 mean and centred second
    moment of every feature (FLAP's fluctuation, bias compensation).
    """

    def __init__(self, dim: int, *, gram: bool = False, moments: bool = False,
                 device: torch.device | str | None = None) -> None:
        self.dim = dim
        self.tokens = 0
        self.gram = torch.zeros(dim, dim, device=device) if gram else None  # (in, in)
        self.sq = None if gram else torch.zeros(dim, device=device)  # (in,)
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device) if moments else None  # (in,)
        self.m2 = torch.zeros(dim, dtype=torch.float64, device=device) if moments else None  # (in,)

    @property
    def device(self) -> torch.device:
        return (self.gram if self.gram is not None else self.sq).device

    @classmethod
    def like(cls, other: InputStats) -> InputStats:
        """Empty statistics of the same kind and place as ``other``."""
        return cls(other.dim, gram=other.gram is not None, moments=other.mean is not None, device=other.device)

    def add(self, x: Tensor, channels_first: bool = False) -> None:
        """Accumulate ``x`` (..., in), or (B, in, *spatial) with ``channels_first`` (convolutions)."""
        x = x.detach()
        if channels_first and x.dim() > 2:
            x = x.movedim(1, -1)
        x = x.reshape(-1, self.dim).float()  # (tokens, in)
        n = x.shape[0]
        if n == 0:
            return
        if self.gram is not None:
            add_gram(self.gram, x)
        else:
            self.sq += column_squares(x)
        if self.mean is not None:
            batch_mean = x.mean(0)  # (in,) float32, pairwise summation
            centred = x - batch_mean
            self._merge(n, batch_mean.double() + centred.mean(0).double(), column_squares(centred).double())
        self.tokens += n

    def _merge(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        n_a = self.tokens
        total = n_a + n_b
        delta = mean_b - self.mean  # (in,) float64
        self.mean += delta * (n_b / total)
        self.m2 += m2_b + delta.square() * (n_a * n_b / total)

    def merge(self, other: InputStats) -> None:
        """Add another accumulator of the same kind (e.g. another process's)."""
        if other.tokens == 0:
            return
        if self.gram is not None:
            self.gram += other.gram
        else:
            self.sq += other.sq
        if self.mean is not None:
            self._merge(other.tokens, other.mean, other.m2)
        self.tokens += other.tokens

    def permuted(self, perm: Tensor) -> InputStats:
        """The same statistics with the features taken in the order ``perm`` (dim,)."""
        out = copy.copy(self)  # shares nothing that is rewritten below
        take = lambda t: None if t is None else t[perm]  # noqa: E731
        out.gram = None if self.gram is None else self.gram[perm][:, perm]  # (in, in)
        out.sq, out.mean, out.m2 = take(self.sq), take(self.mean), take(self.m2)
        return out

    def _squares(self) -> Tensor:
        return self.gram.diagonal() if self.gram is not None else self.sq

    def check_finite(self, where: str) -> None:
        if not torch.isfinite(self._squares()).all():
            raise CalibrationError(
                f"NaN/Inf activations reach {where}: the model overflows on the calibration data; "
                "load it in float32 (--dtype float32) or check its weights"
            )

    @property
    def input_norm(self) -> Tensor:
        """(in,) L2 norm of each input feature over all tokens (float32)."""
        return self._squares().clamp_min(0).sqrt()

    @property
    def variance(self) -> Tensor:
        """(in,) sample variance of each feature (float64)."""
        if self.m2 is None:
            raise CalibrationError("a variance was asked of statistics collected without moments")
        return self.m2 / max(self.tokens - 1, 1)

    @property
    def hessian(self) -> Tensor | None:
        """(in, in) X^T X / n, or None when only norms were collected."""
        return None if self.gram is None else self.gram / max(self.tokens, 1)
