"""What every token handle shares: one handle per model at a time, switching on and off between
forwards, removal of its hooks, and latency measured against the model with the handle off."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ConfigError

_MARK = "_prunekit_tokens"  # the model attribute naming the handle applied to it


class Handle:
    """Hooks on ``model`` for ``stage``; subclasses register them in ``_hooks`` and call
    :meth:`_claim` once they are in place."""

    model: nn.Module
    stage: Any
    enabled: bool
    _hooks: list[Any]

    def _claim(self) -> None:
        held = getattr(self.model, _MARK, None)
        if held is not None:
            for hook in self._hooks:
                hook.remove()
            raise ConfigError(f"token method {held.stage.method!r} is already applied to this model; call .remove() "
                              "on its handle (or leave its `with` block) first")
        setattr(self.model, _MARK, self)

    @contextlib.contextmanager
    def disabled(self) -> Iterator["Handle"]:
        """Run the unpruned model inside the block, the hooks idle."""
        before, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = before

    def _reset(self) -> None:
        """Forget the state of a forward in progress (subclasses)."""

    def remove(self) -> None:
        """Take every hook away: the model computes exactly what it did before :func:`apply`."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self.enabled = [], False
        self._reset()
        if getattr(self.model, _MARK, None) is self:
            delattr(self.model, _MARK)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    _last: Any

    def report(self, inputs: Any = None, repeats: int = 10, warmup: int = 2) -> Any:
        """Tokens and MACs per layer of the last forward (a :class:`~prunekit.tokens.TokenReport`);
        with ``inputs`` (the forward's keyword arguments as a dict, or its one positional
        argument) one forward on them first, then latency against the model with the method off,
        interleaved medians over ``repeats`` rounds (:func:`~prunekit.evaluate.latency.latencies_ms`)."""
        latency = dense = None
        if inputs is not None:
            latency, dense = self.measure(inputs, repeats, warmup)
        if self._last is None:
            raise ConfigError(f"no forward has run with token method {self.stage.method!r} on yet; run the model "
                              "once, or pass inputs= to report()")
        return self._report(latency, dense)

    def _report(self, latency: float | None, dense: float | None) -> Any:
        raise NotImplementedError

    def measure(self, inputs: Any, repeats: int, warmup: int) -> tuple[float, float]:
        """One forward on ``inputs`` (keyword arguments as a dict, or the one positional argument)
        with the handle on, then median milliseconds per forward on and off, in interleaved
        rounds (:func:`~prunekit.evaluate.latency.latencies_ms`): ``(pruned, dense)``."""
        from ..evaluate.latency import latencies_ms

        if not self._hooks:
            raise ConfigError("this token handle was removed; apply the method again to measure it")
        before, self.enabled = self.enabled, True
        try:
            with torch.no_grad():
                self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)
        finally:
            self.enabled = before
        times = latencies_ms({"dense": _Switch(self, False), "pruned": _Switch(self, True)}, lambda: inputs,
                             repeats=repeats, warmup=warmup)
        return times["pruned"], times["dense"]


class _Switch(nn.Module):
    """The handle's model with the method on or off, as a module :func:`latencies_ms` can time
    (the model is held outside the module tree, so ``.eval()`` here leaves it as it is)."""

    def __init__(self, handle: Handle, on: bool) -> None:
        super().__init__()
        self._handle, self._on = (handle,), on

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        handle = self._handle[0]
        before, handle.enabled = handle.enabled, self._on
        try:
            with torch.no_grad():
                return handle.model(*args, **kwargs)
        finally:
            handle.enabled = before





def applied(model: nn.Module) -> Handle | None:
    """The token handle applied to ``model`` now (a result's tokens stage leaves one), or None."""
    return getattr(model, _MARK, None)


def remove(model: nn.Module) -> bool:
    """Take the token handle off ``model``, if one is applied; whether one was."""
    handle = applied(model)
    if handle is not None:
        handle.remove()
    return handle is not None
__all__ = ["Handle", "applied", "remove"]
