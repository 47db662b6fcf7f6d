"""MergingPress and MergingDecodingPress: merge-on-evict for any kind of kvpress press."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from kvpress import AdaKVPress, BasePress, CriticalAdaKVPress, DecodingPress, DMSPress, ScorerPress
from kvpress.presses.base_press import is_prefilling
from kvpress.presses.prefill_decoding_press import PrefillDecodingPress
from kvpress.utils import compute_n_kept, extract_keys_and_values
from torch import nn
from transformers import PreTrainedModel, QuantizedCache

from mergepress.kernels import MergeConfig, MergeStats, merge_adaptive, merge_uniform

SUPPORTED_KINDS = (
    "a ScorerPress that keeps ScorerPress.compress (KnormPress, SnapKVPress, ExpectedAttentionPress, "
    "KVzapPress, ...), a mask-based press (AdaKVPress, CriticalAdaKVPress) or a hook-based press (DMSPress)"
)


def press_kind(press: object) -> str:
    """``"scorer"``, ``"mask"`` or ``"hook"``: how MergingPress must wrap ``press``.

    Raises ``TypeError`` for anything else, naming the supported kinds.
    """
    if isinstance(press, (DecodingPress, PrefillDecodingPress)):
        raise TypeError(
            f"{type(press).__name__} compresses while decoding; use MergingDecodingPress(base_press=...) instead"
        )
    if isinstance(press, DMSPress):
        return "hook"
    if isinstance(press, (AdaKVPress, CriticalAdaKVPress)):
        return "mask"
    if isinstance(press, ScorerPress):
        if type(press).compress is not ScorerPress.compress:
            # e.g. PyramidKVPress: its own compress picks the budget, score+top-k would not.
            raise TypeError(
                f"{type(press).__name__} overrides ScorerPress.compress, so the tokens it keeps are not "
                f"the top-k of its scores; MergingPress supports {SUPPORTED_KINDS}"
            )
        return "scorer"
    raise TypeError(f"MergingPress cannot wrap {type(press).__name__}; it supports {SUPPORTED_KINDS}")


@dataclass
class MergingPress(BasePress):
    """Merge-on-evict: evicted tokens are folded into their most similar survivor, not dropped.

    Wraps a kvpress press, which still decides *which* tokens leave the cache; MergingPress only
    changes *how* they leave. Each evicted token's value (and key, with ``merge_keys``) is
    blended into the surviving token whose key is most cosine-similar. Keys are left alone by
    default because blending rotated keys mixes RoPE positions. See :mod:`mergepress.kernels`
    for the blend and the order of the gates.

    Design and RULER results: https://github.com/NVIDIA/kvpress/pull/219. Related: Token Merging
    (https://arxiv.org/abs/2210.09461), D2O (https://arxiv.org/abs/2406.13035).

    Parameters
    ----------
    press:
        The wrapped press, one of three kinds: a ScorerPress (uniform kernel on its top-k), a
        mask-based press such as AdaKVPress (adaptive kernel on ``module.masked_key_indices``)
        or a hook-based press such as DMSPress (its forward hook runs, then the tokens it newly
        masked are merged). The positional order ``(press, similarity_threshold,
        merge_fraction)`` is kvpress's, so ``kvpress.MergingPress`` code keeps working.
    similarity_threshold:
        Merge only when the cosine similarity is at least this, in [-1, 1].
    merge_fraction:
        Per head, only the most similar fraction of the candidates merge, in (0, 1].
    merge_keys:
        Also blend keys (off by default: RoPE-safe).
    value_norm_weighting:
        Scale the weight by ``‖v_i‖ / (‖v_i‖ + ‖v_j‖)``.
    max_merge_per_token:
        Each survivor absorbs at most this many evicted tokens, the most similar (0 = no cap).
    merge_error_gate:
        Skip a merge whose estimated error ``‖v_i‖(1−w)/(1+w)`` exceeds this (0 = off).
    diagnostics:
        Record per layer and head what was evicted, merged and gated; read it with
        :meth:`diagnostics_frame`. Off by default, and then it costs nothing.

    Notes
    -----
    kvpress's pipeline only keeps a press active while decoding when the press *is* a DMSPress,
    so ``MergingPress(DMSPress(..., decoding=True))`` merges during the prefill there; to merge
    while decoding, keep ``with press(model):`` open around generation (the sweep engine does).
    """

    press: BasePress = None  # type: ignore[assignment]
    similarity_threshold: float = 0.0
    merge_fraction: float = 1.0
    merge_keys: bool = False
    value_norm_weighting: bool = True
    max_merge_per_token: int = 0
    merge_error_gate: float = 0.0
    diagnostics: bool = False
    _rows: list[dict] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._kind = press_kind(self.press)
        self._config = MergeConfig(
            similarity_threshold=self.similarity_threshold,
            merge_keys=self.merge_keys,
            value_norm_weighting=self.value_norm_weighting,
            max_merge_per_token=self.max_merge_per_token,
            merge_fraction=self.merge_fraction,
            merge_error_gate=self.merge_error_gate,
        )

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        # Keep kind and validated config in step when a field is changed after construction.
        if "_config" not in self.__dict__:
            return
        if name == "press":
            self._kind = press_kind(value)
        elif name in MergeConfig.__dataclass_fields__:
            self._config = MergeConfig(**{f: getattr(self, f) for f in MergeConfig.__dataclass_fields__})

    @property
    def config(self) -> MergeConfig:
        """The validated merge parameters."""
        return self._config

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        self.press.compression_ratio = value

    @property
    def threshold(self) -> float | None:
        """The wrapped hook-based press's score threshold (DMSPress)."""
        if self._kind != "hook":
            raise AttributeError(f"{type(self.press).__name__} has no threshold")
        return self.press.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        if self._kind != "hook":
            raise AttributeError(f"{type(self.press).__name__} has no threshold")
        self.press.threshold = value

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        self.press.post_init_from_model(model)
        self._rows.clear()

    # --- scorer and mask-based presses: BasePress.forward_hook calls compress -----------------

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress one layer's cache ``keys, values (B, H, L, D)``; merge instead of drop.

        Scorer presses return ``(B, H, n_kept, D)``; mask-based presses return full-length
        tensors whose survivors hold the merged values.
        """
        if self._kind == "hook":
            raise TypeError(f"{type(self.press).__name__} compresses in its forward hook, not in compress")
        if self._kind == "scorer":
            if self.press.compression_ratio == 0:
                return keys, values
            scores = self.press.score(module, hidden_states, keys, values, attentions, kwargs)
            n_kept = compute_n_kept(keys.shape[2], self.press.compression_ratio)
            kept = scores.topk(n_kept, dim=-1).indices
            keys, values, stats = merge_uniform(keys, values, kept, self._config, with_stats=self.diagnostics)
        else:
            keys, values = self.press.compress(module, hidden_states, keys, values, attentions, kwargs)
            masked = getattr(module, "masked_key_indices", None)
            if masked is None:
                return keys, values
            evicted = _mask_from_indices(masked, keys.shape[:3], keys.device)
            keys, values, stats = merge_adaptive(keys, values, evicted, self._config, with_stats=self.diagnostics)
        if stats is not None:
            self._record(module.layer_idx, _phase(kwargs, hidden_states), stats)
        return keys, values

    def merge(
        self, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """kvpress-compatible merge: fold the tokens not in ``indices`` into those in it.

        ``keys, values (B, H, L, D)``, ``indices (B, H, n_kept)``. Returns full-length
        ``(B, H, L, D)`` tensors whose kept positions hold the merged tokens (keys unchanged
        unless ``merge_keys``), exactly like ``kvpress.MergingPress.merge``.
        """
        kept_keys, kept_values, _ = merge_uniform(keys, values, indices, self._config)
        where = indices.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        out_keys = keys.scatter(2, where, kept_keys) if self.merge_keys else keys
        return out_keys, values.scatter(2, where, kept_values)

    # --- hook-based presses: run their hook, then merge what they newly masked ---------------

    def forward_hook(self, module: nn.Module, input: list[torch.Tensor], kwargs: dict, output: list):
        if self._kind != "hook":
            return super().forward_hook(module, input, kwargs, output)
        before = getattr(module, "masked_key_indices", None)
        n_before = 0 if before is None else len(before[0])
        output = self.press.forward_hook(module, input, kwargs, output)
        after = getattr(module, "masked_key_indices", None)
        if after is None or len(after[0]) == n_before:
            return output
        cache = kwargs["past_key_values"]
        keys, values = extract_keys_and_values(cache, module.layer_idx)
        shape = keys.shape[:3]
        masked = _mask_from_indices(after, shape, keys.device)
        new = _mask_from_indices([i[n_before:] for i in after], shape, keys.device)
        # Tokens masked at earlier steps are gone: neither sources nor survivors.
        keys, values, stats = merge_adaptive(
            keys, values, new, self._config, survivors=~masked, with_stats=self.diagnostics
        )
        _write_cache(cache, module.layer_idx, keys, values)
        if stats is not None:
            self._record(module.layer_idx, _phase(kwargs, kwargs["hidden_states"]), stats)
        return output

    # --- diagnostics -------------------------------------------------------------------------

    def diagnostics_frame(self) -> pd.DataFrame:
        """One row per (merge call, layer, head), summed over the batch.

        Columns: ``layer, phase, call, head, evicted, merged, gated_threshold, gated_fraction,
        gated_error, gated_cap, zero_weight, mean_similarity, min_similarity, max_absorbed``.
        ``call`` counts the merges of that layer since the press was applied to the model.
        """
        return pd.DataFrame(self._rows, columns=_DIAG_COLUMNS)

    def _record(self, layer: int, phase: str, stats: MergeStats) -> None:
        call = sum(1 for r in self._rows if r["layer"] == layer and r["head"] == 0)
        s = {k: v.detach().cpu() for k, v in vars(stats).items()}
        merged = s["merged"].sum(0)
        for h in range(merged.shape[0]):
            n = int(merged[h])
            self._rows.append(
                {
                    "layer": layer,
                    "phase": phase,
                    "call": call,
                    "head": h,
                    **{c: int(s[c][:, h].sum()) for c in _COUNT_COLUMNS},
                    "mean_similarity": float(s["similarity_sum"][:, h].sum()) / n if n else float("nan"),
                    "min_similarity": float(s["similarity_min"][:, h].min()) if n else float("nan"),
                    "max_absorbed": int(s["max_absorbed"][:, h].max()),
                }
            )


@dataclass
class MergingDecodingPress(DecodingPress):
    """Merge-on-evict while decoding: every ``compression_interval`` generated tokens the cache is
    cut back to ``target_size`` as in kvpress's :class:`DecodingPress`, and the tokens the
    ``base_press`` (a ScorerPress or AdaKVPress) evicts are merged into their most similar
    survivors instead of dropped. Merge parameters as in :class:`MergingPress`.
    """

    similarity_threshold: float = 0.0
    merge_fraction: float = 1.0
    merge_keys: bool = False
    value_norm_weighting: bool = True
    max_merge_per_token: int = 0
    merge_error_gate: float = 0.0
    diagnostics: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.base_press, (ScorerPress, AdaKVPress)):
            raise TypeError(
                f"MergingDecodingPress needs a ScorerPress or AdaKVPress, got {type(self.base_press).__name__}"
            )
        super().__post_init__()
        self._merger = MergingPress(
            self.base_press,
            similarity_threshold=self.similarity_threshold,
            merge_fraction=self.merge_fraction,
            merge_keys=self.merge_keys,
            value_norm_weighting=self.value_norm_weighting,
            max_merge_per_token=self.max_merge_per_token,
            merge_error_gate=self.merge_error_gate,
            diagnostics=self.diagnostics,
        )

    def post_init_from_model(self, model: PreTrainedModel) -> None:
        self._merger.post_init_from_model(model)

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut ``keys, values (B, H, L, D)`` back to ``target_size`` tokens, merging the rest."""
        ratio = self._find_target_compression_ratio(keys.shape[2], self._resolve_target_size(kwargs))
        original = self.base_press.compression_ratio
        self.base_press.compression_ratio = ratio
        try:
            return self._merger.compress(module, hidden_states, keys, values, attentions, kwargs)
        finally:
            self.base_press.compression_ratio = original

    def diagnostics_frame(self) -> pd.DataFrame:
        """See :meth:`MergingPress.diagnostics_frame`."""
        return self._merger.diagnostics_frame()


_COUNT_COLUMNS = ("evicted", "merged", "gated_threshold", "gated_fraction", "gated_error", "gated_cap", "zero_weight")
_DIAG_COLUMNS = ["layer", "phase", "call", "head", *_COUNT_COLUMNS, "mean_similarity", "min_similarity", "max_absorbed"]


def _mask_from_indices(indices, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """``(B, H, L)`` bool mask from kvpress's ``(batch_idx, head_idx, seq_idx)`` triple."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    b, h, s = (i.to(device) for i in indices)
    mask[b, h, s] = True
    return mask


def _phase(kwargs: dict, hidden_states: torch.Tensor) -> str:
    return "prefill" if is_prefilling(kwargs["cache_position"], hidden_states.shape[1]) else "decoding"


def _write_cache(cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Store one layer's keys and values back into a (possibly quantized) cache."""
    layer = cache.layers[layer_idx]
    if isinstance(cache, QuantizedCache):
        layer._quantized_keys = layer._quantize(keys, axis=layer.axis_key)
        layer._quantized_values = layer._quantize(values, axis=layer.axis_value)
        layer.keys = torch.zeros(0, dtype=keys.dtype, device=keys.device)
        layer.values = torch.zeros(0, dtype=keys.dtype, device=keys.device)
        layer.cumulative_length = keys.shape[2]
    else:
        layer.keys = keys
        layer.values = values
