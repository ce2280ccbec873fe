"""Calibration: one data type, text sampling, block-input capture, running statistics, and
the one sequential runner every capability calibrates with."""
from .cache import HiddenCache
from .data import Batch, CalibrationData, as_calibration
from .runner import Observer, RunOptions, RunReport, run_sequential
from .stats import InputStats

__all__ = ["CalibrationData", "Batch", "as_calibration", "run_sequential", "RunOptions", "RunReport", "Observer",
           "InputStats", "HiddenCache"]
