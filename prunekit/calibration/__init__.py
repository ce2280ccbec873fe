"""Calibration: text sampling, block-input capture, running statistics, the sequential runner."""
from .runner import run_sequential
from .stats import InputStats, StatGroup, StatsCollector

__all__ = ["run_sequential", "InputStats", "StatGroup", "StatsCollector"]
