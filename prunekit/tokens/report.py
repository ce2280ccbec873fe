"""What a token-pruned forward cost: tokens per layer, multiply-accumulates per layer counted
analytically (:meth:`~prunekit.tokens.layout.Block.macs`, the matmuls of the blocks; what
selection and merging themselves cost is not counted), and optionally measured latency
against the unpruned run."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from .layout import Block


@dataclass(frozen=True)
class TokenReport:
    """``tokens_in[i]``/``tokens_out[i]``: tokens entering and leaving layer i (one sequence of
    the batch; every sequence keeps as many); ``macs[i]``: the layer's multiply-accumulates per
    sequence, ``dense_macs[i]`` the same with no token removed; ``latency_ms`` and
    ``dense_latency_ms``: median milliseconds per forward with and without the method, measured
    in interleaved rounds (None when not measured)."""

    method: str
    tokens_in: tuple[int, ...]
    tokens_out: tuple[int, ...]
    macs: tuple[int, ...]
    dense_macs: tuple[int, ...]
    latency_ms: float | None = None
    dense_latency_ms: float | None = None

    @property
    def macs_ratio(self) -> float:
        """MACs of the blocks relative to the unpruned run."""
        return sum(self.macs) / sum(self.dense_macs)

    @property
    def speedup(self) -> float | None:
        """Unpruned over pruned latency (None when not measured)."""
        if self.latency_ms is None or self.dense_latency_ms is None:
            return None
        return self.dense_latency_ms / self.latency_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "macs_ratio": self.macs_ratio, "speedup": self.speedup}


def token_report(method: str, blocks: Sequence[Block], tokens_in: Sequence[int], tokens_out: Sequence[int],
                 latency_ms: float | None = None, dense_latency_ms: float | None = None) -> TokenReport:
    """The report of one forward through ``blocks`` that saw ``tokens_in`` and ``tokens_out``."""
    n0 = tokens_in[0]
    return TokenReport(method, tuple(tokens_in), tuple(tokens_out),
                       tuple(b.macs(n) for b, n in zip(blocks, tokens_in)), tuple(b.macs(n0) for b in blocks),
                       latency_ms, dense_latency_ms)


__all__ = ["TokenReport", "token_report"]


def stage_report(handle: Any, data: Any, windows: int = 4, repeats: int = 5) -> dict[str, Any]:
    """A recipe's tokens stage measured on its calibration data: tokens and MACs per layer and
    latency against the model with the method off, on the first window; for a decoder the
    continuation perplexity, cut and uncut, over the last ``windows`` windows; for an encoder
    the cosine of mean embeddings on the first ``windows`` windows."""
    from ..errors import ConfigError
    from .decoder import PromptHandle
    from .quality import continuation_perplexity, embedding_cosine

    ids = getattr(data, "ids", None) if data is not None else None
    if ids is None:
        raise ConfigError("a tokens stage is measured on token windows: give the recipe a calibration text (or "
                          "data= token ids)")
    device = next(handle.model.parameters()).device
    first = {"input_ids": ids[:1].to(device)}
    out: dict[str, Any] = {"method": handle.stage.method, "keep": handle.stage.keep, "r": handle.stage.r,
                           "applied": "hooks on the returned model (prunekit.tokens.remove(model) takes them off; "
                                      "prunekit.tokens.apply(model, recipe.stages[-1]) puts them back after load)"}
    if isinstance(handle, PromptHandle):
        out["after"] = handle.after
        out.update(continuation_perplexity(handle, ids[-windows:]))
    else:
        out["embedding_cosine"] = embedding_cosine(handle, {"input_ids": ids[:windows].to(device)})
    out.update(handle.report(first, repeats=repeats, warmup=1).to_dict())
    return out
