"""KVzap surrogates trained offline: KVzip+ targets, training, shipped weights and a loader.

kvpress's ``KVzapPress`` downloads ``nvidia/KVzap-{linear,mlp}-<model>`` from the hub, which has
nothing for the embedded SmolLM2-135M (and is unreachable offline). This package reproduces the
KVzap recipe (KVzip+ scores from a "repeat the context" prompt, per-layer linear and MLP
surrogates on hidden states) and ships surrogates for the embedded model:

>>> from kvpress import DMSPress
>>> from mergepress.kvzap import KVzapPress, shipped_thresholds
>>> press = DMSPress(KVzapPress(model_type="mlp"), threshold=-4.0)   # loads our weights, no network

Train for another model with ``python -m mergepress.kvzap train --model <model> --out DIR``.
"""

from mergepress.kvzap.press import KVzapPress
from mergepress.kvzap.surrogate import (
    KVzapWeightsError,
    load_surrogate,
    model_fingerprint,
    read_metadata,
    save_surrogate,
    shipped_thresholds,
    shipped_weights,
)
from mergepress.kvzap.targets import RepeatPrompt, collect_targets, kvzip_plus_log_scores, repeat_prompt

__all__ = [
    "KVzapPress",
    "KVzapWeightsError",
    "RepeatPrompt",
    "collect_targets",
    "kvzip_plus_log_scores",
    "load_surrogate",
    "model_fingerprint",
    "read_metadata",
    "repeat_prompt",
    "save_surrogate",
    "shipped_thresholds",
    "shipped_weights",
]
