"""Evaluation: perplexity, sparsity and size, time and memory; lm-eval accuracy in .zero_shot (imported apart)."""
from .latency import latencies_ms
from .perplexity import Perplexity, perplexity
from .resources import peak_rss_mb
from .sparsity import count_params, sparsity_report

__all__ = ["Perplexity", "perplexity", "peak_rss_mb", "count_params", "sparsity_report", "latencies_ms"]
