"""mergepress: merge-on-evict KV-cache compression for kvpress.

>>> from kvpress import KnormPress
>>> from mergepress import MergingPress
>>> press = MergingPress(KnormPress(compression_ratio=0.5))
"""

from mergepress.kernels import MergeConfig, MergeStats, merge_adaptive, merge_into, merge_uniform, nearest_survivor
from mergepress.models import load_model
from mergepress.press import MergingDecodingPress, MergingPress, press_kind

__all__ = [
    "MergeConfig",
    "MergeStats",
    "MergingDecodingPress",
    "MergingPress",
    "load_model",
    "merge_adaptive",
    "merge_into",
    "merge_uniform",
    "nearest_survivor",
    "press_kind",
]
