"""Exception types. Every error names the bad value, what was expected, and the fix."""


class PrunekitError(Exception):
    """Base class of all errors prunekit raises on purpose (the CLI exits 2 on these)."""


class ConfigError(PrunekitError, ValueError):
    """A configuration value is out of range or unknown."""


class ModelLoadError(PrunekitError):
    """A model path is missing, corrupt, or cannot be resolved."""


class UnsupportedModelError(PrunekitError):
    """The model's architecture lacks something prunekit needs (blocks, supported layers)."""


class DataError(PrunekitError):
    """Calibration or evaluation text is missing, empty or too short."""


class CalibrationError(PrunekitError):
    """Calibration failed numerically (NaN/Inf activations, singular statistics)."""


class OutputError(PrunekitError):
    """The output location cannot be written."""


class ScheduleError(ConfigError):
    """A training-time pruning schedule is inconsistent (end before start, target outside [0, 1))."""


class OptimizerMismatchError(PrunekitError, ValueError):
    """A sparsity controller was given an optimizer that does not own the parameters it masks."""


class StructureError(PrunekitError):
    """A model's structure cannot be traced or a structural removal would break it."""


class NoSuchStructure(StructureError):
    """The model has none of the structure asked for (no MoE experts, no attention heads):
    nothing is wrong with it, that structure just does not apply."""


class UntraceableOp(StructureError):
    """An op the structural tracer cannot follow on tensors that carry units. ``op``: its
    name; ``module``: the innermost module running it ("" at the model's top level)."""

    def __init__(self, message: str, op: str = "", module: str = "") -> None:
        super().__init__(message)
        self.op, self.module = op, module


class ReplayError(UnsupportedModelError):
    """The model cannot run with its blocks replayed one by one (a block returns a tuple the
    model unpacks, blocks run out of order or not once each); the runner falls back to
    whole-model forwards."""


class KernelUnavailableError(PrunekitError):
    """A sparse kernel cannot run here (no CUDA device, too old a GPU, a torch without it) or
    gives a different result from the dense layer it would replace."""
