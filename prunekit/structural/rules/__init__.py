"""Coupling rules: how each torch op moves unit labels (facets) and couples them. One table,
:data:`RULES`, maps op names to rules; :mod:`.base` has the helpers a new rule is written with:

    from prunekit.structural.rules import rule, merge

    @rule("my_op")
    def my_op(tr, name, args, kwargs, out):
        tr.set(out, merge(tr, [(tr.of(args[0]), False)], out.ndim))
"""
from . import tensors, weights  # noqa: F401  (registration)
from .base import RULES, Rule, arg, couple_slices, is_param, merge, pad_to, rule, stat

__all__ = ["RULES", "Rule", "rule", "merge", "couple_slices", "stat", "arg", "pad_to", "is_param"]
