"""Named press configurations, mirroring the seed's experiments.

Every scorer ``X`` comes in three flavours: ``X`` (hard eviction), ``merging_X`` (our
:class:`~mergepress.MergingPress`) and, for scorer presses, ``upstream_merging_X``
(``kvpress.MergingPress``, so both implementations run on the same samples). The number a
configuration takes is its compression ratio, or its score threshold for DMS configurations.
"""

from __future__ import annotations

from collections.abc import Callable

from kvpress import AdaKVPress, BasePress, DMSPress, ExpectedAttentionPress, KnormPress, SnapKVPress
from kvpress import MergingPress as UpstreamMergingPress

from mergepress.kvzap import KVzapPress
from mergepress.press import MergingPress

# name -> (factory taking the ratio or threshold, kind); kind "threshold" marks DMS configurations
BASE: dict[str, tuple[Callable[[float], BasePress], str]] = {
    "knorm": (lambda r: KnormPress(r), "scorer"),
    "snapkv": (lambda r: SnapKVPress(r), "scorer"),
    "expected_attention": (lambda r: ExpectedAttentionPress(r, epsilon=1e-2), "scorer"),
    "adakv_snapkv": (lambda r: AdaKVPress(SnapKVPress(r)), "mask"),
    "adakv_expected_attention": (lambda r: AdaKVPress(ExpectedAttentionPress(r, epsilon=1e-2)), "mask"),
    # KVzap scores are log KVzip+ estimates from the surrogates trained offline for the embedded
    # model (mergepress/kvzap/weights); any other model needs `python -m mergepress.kvzap train`.
    "kvzap_mlp": (lambda r: KVzapPress(compression_ratio=r, model_type="mlp"), "scorer"),
    "kvzap_linear": (lambda r: KVzapPress(compression_ratio=r, model_type="linear"), "scorer"),
    "dms_kvzap_mlp": (lambda t: DMSPress(KVzapPress(model_type="mlp"), threshold=t), "threshold"),
    # DMS over KnormPress (scores are -||k||, thresholds around -20): a surrogate-free DMS.
    "dms_knorm": (lambda t: DMSPress(KnormPress(), threshold=t), "threshold"),
}


def registry() -> list[str]:
    """Every configuration name, ``no_press`` first."""
    names = ["no_press"]
    for name, (_, kind) in BASE.items():
        names += [name, f"merging_{name}"]
        if kind == "scorer":
            names.append(f"upstream_merging_{name}")
    return names


def uses_threshold(name: str) -> bool:
    """True for DMS configurations, whose number is a score threshold, not a ratio."""
    return BASE[base_name(name)][1] == "threshold" if name != "no_press" else False


def build_press(name: str, value: float, merge_params: dict | None = None) -> BasePress | None:
    """The press for configuration ``name`` at ratio (or DMS threshold) ``value``.

    ``merge_params`` (e.g. ``{"merge_fraction": 0.75}``) go to :class:`MergingPress`; they are
    rejected for other configurations so a typo cannot silently do nothing.
    """
    if name not in registry():
        raise ValueError(f"unknown configuration {name!r}; the registry holds: {', '.join(registry())}")
    merge_params = dict(merge_params or {})
    if merge_params and not name.startswith("merging_"):
        raise ValueError(f"merge parameters apply to merging_* configurations only, not {name!r}")
    if name == "no_press":
        return None
    factory, _ = BASE[base_name(name)]
    inner = factory(value)
    if name.startswith("merging_"):
        return MergingPress(inner, **merge_params)
    if name.startswith("upstream_merging_"):
        return UpstreamMergingPress(inner)
    return inner


def base_name(name: str) -> str:
    """The evicting press a configuration wraps: ``merging_knorm`` and ``upstream_merging_knorm`` -> ``knorm``."""
    for prefix in ("upstream_merging_", "merging_"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name
