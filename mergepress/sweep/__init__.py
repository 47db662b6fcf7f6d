"""The sweep engine: prefill each context once, evaluate every press configuration on it.

>>> from mergepress.sweep import Config, run_sweep, summarize
>>> run_sweep(model, tok, suite, [Config("knorm", 0.5), Config("merging_knorm", 0.5)], "results/x.csv", settings={})
"""

from mergepress.sweep.engine import apply_press, capture_prefill
from mergepress.sweep.registry import build_press, registry
from mergepress.sweep.run import Config, run_sweep, summarize

__all__ = ["Config", "apply_press", "build_press", "capture_prefill", "registry", "run_sweep", "summarize"]
