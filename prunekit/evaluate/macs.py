"""Multiply-accumulates of one forward pass, counted by the structural tracer (Linear, Conv,
HF Conv1D, fused experts, attention matmuls), so weights and structure reports agree."""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

log = logging.getLogger(__name__)


def count_macs(model: nn.Module, inputs: Any) -> int | None:
    """MACs of ``model`` on ``inputs`` (a dict of keyword arguments or a tuple), or None when
    the tracer has no rule for one of the model's ops (the reason is logged)."""
    from ..errors import StructureError
    from ..structural.rules import RULES
    from ..structural.trace import trace_model

    try:
        return trace_model(model, inputs, RULES).macs
    except StructureError as exc:
        log.info("MACs not counted: %s", exc)
        return None
