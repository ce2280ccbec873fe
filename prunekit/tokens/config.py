"""The token stage: which method reduces tokens, after which layers, and by how much.

An amount is a keep rate (the fraction of the tokens besides [CLS] a layer lets through) or
``r`` (how many tokens a layer removes, ToMe's parameter). Every method removes the same number
of tokens at the same amount, so methods compare at equal cost: EViT counts its fused token
among the tokens it keeps (at ``keep=0.7`` it keeps 0.7 of the tokens, one of them the fusion
of the rest), ToMe and the random control remove exactly as many.

In a decoder the prompt is cut once: the first ``after`` layers see every prompt token, the
later ones the ``keep`` fraction a method picks (FastV's ``K`` and ``R``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..errors import ConfigError
from ..rounding import count

#: one layer's amount: ("keep", rate in (0, 1]) or ("r", tokens removed >= 0)
Amount = tuple[str, Union[float, int]]


def _check_keep(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{where}={value!r} is outside (0, 1]: give the fraction of tokens a layer keeps, "
                          "e.g. keep=0.7 (1.0 keeps every token)")
    return float(value)


def _check_r(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}={value!r} must be an integer >= 0: the number of tokens a layer merges or drops "
                          "(0 keeps every token); give a fraction as keep= instead")
    return value


@dataclass(frozen=True)
class TokenStage:
    """Token pruning or merging at inference.

    ``method``: a :data:`~prunekit.tokens.TOKEN_METHODS` entry (``evit``, ``tome``, ``random``).
    The amount, exactly one of: ``keep``, the fraction of tokens (besides [CLS]) kept after each
    chosen layer, in (0, 1]; ``r``, the number of tokens removed after each chosen layer;
    ``schedule``, one amount per layer of the model, all keep rates (floats) or all ``r``
    (integers), 1.0 or 0 where a layer removes nothing. ``layers``: the 0-based layers after
    which tokens go, with ``keep`` or ``r`` (default: every layer but the last, after which a
    reduction saves no compute). ``seed``: of the random control.

    Decoders (``fastv``, ``divprune``, ``random`` on a causal LM): ``keep``, the fraction of the
    prompt's tokens the later layers keep (the last token always among them), and ``after``, how
    many layers see every prompt token first (default 2, FastV's ``K``; 0 cuts the prompt before
    the first layer, where DivPrune's paper cuts). Tokens generated after the prompt are kept."""

    method: str
    keep: float | None = None
    r: int | None = None
    layers: tuple[int, ...] | None = None
    schedule: tuple[float, ...] | tuple[int, ...] | None = None
    seed: int = 0
    after: int | None = None

    def __post_init__(self) -> None:
        from .methods import TOKEN_METHODS

        TOKEN_METHODS.get(self.method)
        given = [name for name in ("keep", "r", "schedule") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(f"tokens ({self.method}): give exactly one of keep= (a fraction in (0, 1]), r= (tokens "
                              f"removed per layer) or schedule= (one amount per layer); got {given or 'none'}")
        if self.keep is not None:
            object.__setattr__(self, "keep", _check_keep(self.keep, "keep"))
        if self.r is not None:
            _check_r(self.r, "r")
        if self.layers is not None:
            self._check_layers()
        if self.schedule is not None:
            self._check_schedule()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"tokens: seed must be an integer, got {self.seed!r}")
        self._check_decoder(TOKEN_METHODS.get(self.method))

    def _check_decoder(self, entry: object) -> None:
        if self.after is not None:
            if getattr(entry, "select", None) is None:
                raise ConfigError(f"tokens ({self.method}): after= sets where a decoder's prompt is cut, but "
                                  f"{self.method!r} is an encoder method; for decoders use fastv, divprune or random")
            if isinstance(self.after, bool) or not isinstance(self.after, int) or self.after < 0:
                raise ConfigError(f"tokens: after={self.after!r} must be an integer >= 0: the number of layers that "
                                  "see every prompt token before the cut (0 cuts before the first layer)")
        if self.decoder:
            self.check_prompt_amounts()

    def check_prompt_amounts(self) -> None:
        """A decoder's prompt is cut once: ``keep`` (and ``after``), no ``r``, ``schedule`` or ``layers``."""
        if self.keep is None or self.layers is not None:
            raise ConfigError(f"tokens ({self.method}): a decoder's prompt is cut once, so give keep= (the fraction "
                              "of prompt tokens kept) and after= (the layers that see them all), not r=, "
                              "schedule= or layers=")

    @property
    def decoder(self) -> bool:
        """Whether this stage cuts a decoder's prompt (a decoder-only method, or ``after=`` given)."""
        from .methods import TOKEN_METHODS

        return self.after is not None or TOKEN_METHODS.get(self.method).fn is None

    @property
    def cut_after(self) -> int:
        """The layers that see every prompt token (``after``, default 2)."""
        return 2 if self.after is None else self.after

    def _check_layers(self) -> None:
        if self.schedule is not None:
            raise ConfigError("tokens: layers= goes with keep= or r=; a schedule= already names an amount for "
                              "every layer (1.0 or 0 where a layer keeps every token)")
        layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if bad or len(set(layers)) != len(layers):
            raise ConfigError(f"tokens: layers must be distinct 0-based layer indices, got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(sorted(layers)))

    def _check_schedule(self) -> None:
        values = tuple(self.schedule)
        if not values:
            raise ConfigError("tokens: schedule= is empty; give one amount per layer of the model")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            for i, v in enumerate(values):
                _check_r(v, f"schedule[{i}]")
        elif all(isinstance(v, float) for v in values):
            for i, v in enumerate(values):
                _check_keep(v, f"schedule[{i}]")
        else:
            raise ConfigError(f"tokens: schedule {values!r} mixes keep rates and counts; give all keep rates as "
                              "floats (0.7, 1.0, ...) or all token counts r as integers (8, 0, ...)")
        object.__setattr__(self, "schedule", values)

    def plan(self, depth: int) -> tuple[Amount | None, ...]:
        """The amount of each of a model's ``depth`` layers (None: the layer removes nothing)."""
        if self.schedule is not None:
            if len(self.schedule) != depth:
                raise ConfigError(f"tokens: schedule has {len(self.schedule)} amounts but the model has {depth} "
                                  f"layers; give exactly {depth}")
            kind, none = ("r", 0) if isinstance(self.schedule[0], int) else ("keep", 1.0)
            return tuple(None if v == none else (kind, v) for v in self.schedule)
        layers = self.layers if self.layers is not None else tuple(range(depth - 1))
        if any(i >= depth for i in layers):
            raise ConfigError(f"tokens: layers {list(layers)} reach past the model's {depth} layers; "
                              f"use indices 0 to {depth - 1}")
        amount: Amount = ("keep", self.keep) if self.keep is not None else ("r", self.r)
        return tuple(amount if i in layers else None for i in range(depth))


def removed(amount: Amount | None, n: int) -> int:
    """Tokens a layer with ``amount`` removes out of ``n`` (one of them [CLS]).

    A keep rate removes ``count(1 - keep, n - 1)`` (prunekit's one rounding rule, halves up);
    ``r`` removes ``r``; either way at least one token besides [CLS] is left."""
    if amount is None or n <= 2:
        return 0
    kind, value = amount
    wanted = count(1.0 - value, n - 1) if kind == "keep" else int(value)
    return max(0, min(wanted, n - 2))


__all__ = ["Amount", "TokenStage", "removed"]
