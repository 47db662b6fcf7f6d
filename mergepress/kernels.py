"""Merge-on-evict kernels: fold each evicted token into its most cosine-similar survivor.

Two entry points share one core:

* :func:`merge_uniform` — every head keeps the same number of tokens (scorer presses). Input
  is the full cache and the kept indices; output is the merged kept tokens.
* :func:`merge_adaptive` — heads keep different numbers of tokens (AdaKV, DMS). Input is the
  full cache and a boolean evicted mask; output is the full cache with merged survivors and
  the evicted positions untouched (the attention mask hides them).

The core (:func:`merge_into`) works on padded per-head lists of *sources* (evicted tokens)
and *destinations* (survivors). For one source ``i`` routed to destination ``j`` with cosine
similarity ``s`` between their keys, the blend weight is ``w_i = max(s, 0)``, times
``‖v_i‖ / (‖v_i‖ + ‖v_j‖)`` with value-norm weighting, and every survivor becomes

    x_j ← (x_j + Σ_i w_i x_i) / (1 + Σ_i w_i)

for ``x = v`` (and ``x = k`` with ``merge_keys``). Accumulation is in float32 whatever the
input dtype. Gates, applied in this order, turn a merge into a plain eviction:

1. ``similarity_threshold``: merge only if ``s >= threshold``;
2. ``merge_fraction``: per head, keep the candidates whose ``s`` is at least the (1 − f)
   quantile (linear interpolation) of the candidates' similarities — kvpress's rule;
3. ``merge_error_gate``: skip a merge whose estimated error ``‖v_i‖·(1−w)/(1+w)`` (with
   ``w = clamp(s, 0, 1)``) exceeds the gate (0 = off);
4. ``max_merge_per_token``: each survivor absorbs at most k sources, the most similar ones,
   ties to the earlier source position (0 = unlimited).

The nearest-survivor search runs in blocks so its extra memory stays under
``block_bytes`` whatever the context length; ties go to the first survivor in the
destination order.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

_EPS = 1e-6  # norm floor: zero-norm keys/values get similarity 0 and weight 0, never NaN
DEFAULT_BLOCK_BYTES = 256 * 2**20  # similarity block budget for the nearest-survivor search


@dataclass(frozen=True)
class MergeConfig:
    """The merge parameters, validated once. See the module docstring for their meaning."""

    similarity_threshold: float = 0.0
    merge_keys: bool = False
    value_norm_weighting: bool = True
    max_merge_per_token: int = 0
    merge_fraction: float = 1.0
    merge_error_gate: float = 0.0

    def __post_init__(self) -> None:
        if not -1.0 <= self.similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold must be in [-1, 1], got {self.similarity_threshold}")
        if not 0.0 < self.merge_fraction <= 1.0:
            raise ValueError(f"merge_fraction must be in (0, 1], got {self.merge_fraction}")
        if isinstance(self.max_merge_per_token, bool) or not isinstance(self.max_merge_per_token, numbers.Integral):
            raise TypeError(f"max_merge_per_token must be an int, got {self.max_merge_per_token!r}")
        if self.max_merge_per_token < 0:
            raise ValueError(f"max_merge_per_token must be >= 0 (0 = unlimited), got {self.max_merge_per_token}")
        if not self.merge_error_gate >= 0.0:
            raise ValueError(f"merge_error_gate must be >= 0 (0 = off), got {self.merge_error_gate}")


@dataclass
class MergeStats:
    """Per-(batch, head) counts of one merge call; every field has shape ``(B, H)``.

    ``evicted`` = ``merged`` + ``gated_threshold`` + ``gated_fraction`` + ``gated_error``
    + ``gated_cap`` + ``zero_weight`` (sources that passed every gate with similarity <= 0,
    hence weight 0).
    """

    evicted: torch.Tensor
    merged: torch.Tensor
    gated_threshold: torch.Tensor
    gated_fraction: torch.Tensor
    gated_error: torch.Tensor
    gated_cap: torch.Tensor
    zero_weight: torch.Tensor
    similarity_sum: torch.Tensor  # over merged sources
    similarity_min: torch.Tensor  # over merged sources; +inf where none merged
    max_absorbed: torch.Tensor  # most sources folded into one survivor


def nearest_survivor(
    src_keys: torch.Tensor,
    dst_keys: torch.Tensor,
    dst_valid: torch.Tensor | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity to, and index of, each source's most similar destination.

    Parameters
    ----------
    src_keys: ``(B, H, E, D)`` keys of the evicted tokens.
    dst_keys: ``(B, H, K, D)`` keys of the survivors.
    dst_valid: ``(B, H, K)`` bool or None; invalid destinations are never chosen.
    block_bytes: bound on the float32 similarity block held at once.

    Returns
    -------
    ``(similarity, index)``, both ``(B, H, E)``: float32 similarity (``-inf`` where a head has
    no valid destination) and int64 index into the K axis (first index on ties).
    """
    B, H, E, D = src_keys.shape
    K = dst_keys.shape[2]
    dst = _unit(dst_keys).flatten(0, 1).transpose(1, 2)  # (BH, D, K)
    src = src_keys.flatten(0, 1)  # (BH, E, D), normalised block by block
    bias = None
    if dst_valid is not None:
        # -inf on invalid destinations: added to the block, max never picks them
        bias = torch.zeros(dst_valid.shape, dtype=torch.float32, device=dst.device)
        bias.masked_fill_(~dst_valid, float("-inf"))
        bias = bias.flatten(0, 1).unsqueeze(1)  # (BH, 1, K)
    sim = torch.empty(B * H, E, dtype=torch.float32, device=src.device)
    idx = torch.empty(B * H, E, dtype=torch.long, device=src.device)
    if E == 0 or K == 0:
        return sim.fill_(float("-inf")).view(B, H, E), idx.zero_().view(B, H, E)
    rows = max(1, block_bytes // (4 * K))  # (head, source) rows per block
    heads_per_block = max(1, rows // E)
    src_per_block = min(E, rows)
    for h0 in range(0, B * H, heads_per_block):
        h1 = min(B * H, h0 + heads_per_block)
        for e0 in range(0, E, src_per_block):
            e1 = min(E, e0 + src_per_block)
            block = torch.bmm(_unit(src[h0:h1, e0:e1]), dst[h0:h1])  # (h, e, K)
            if bias is not None:
                block += bias[h0:h1]
            sim[h0:h1, e0:e1], idx[h0:h1, e0:e1] = block.max(dim=-1)
    return sim.view(B, H, E), idx.view(B, H, E)


def merge_into(
    src_keys: torch.Tensor,
    src_values: torch.Tensor,
    dst_keys: torch.Tensor,
    dst_values: torch.Tensor,
    config: MergeConfig,
    src_valid: torch.Tensor | None = None,
    dst_valid: torch.Tensor | None = None,
    with_stats: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, MergeStats | None]:
    """Fold sources into their nearest destinations: the core both kernels share.

    Parameters
    ----------
    src_keys, src_values: ``(B, H, E, D)`` evicted tokens (padded per head; see ``src_valid``).
    dst_keys, dst_values: ``(B, H, K, D)`` survivors (padded per head; see ``dst_valid``).
    config: merge parameters.
    src_valid: ``(B, H, E)`` bool or None (all valid); invalid sources merge nowhere.
    dst_valid: ``(B, H, K)`` bool or None (all valid); invalid destinations receive nothing.
    with_stats: also return a :class:`MergeStats`.

    Returns
    -------
    ``(keys, values, stats)``: merged destination keys and values ``(B, H, K, D)`` in the input
    dtype (keys are the input tensor itself unless ``config.merge_keys``), and the stats or None.
    """
    B, H, E, D = src_keys.shape
    K = dst_keys.shape[2]
    if E == 0 or K == 0:
        stats = _empty_stats(B, H, E, src_keys.device) if with_stats else None
        return dst_keys, dst_values, stats
    sim, target = nearest_survivor(src_keys, dst_keys, dst_valid, block_bytes)
    valid = torch.ones_like(sim, dtype=torch.bool) if src_valid is None else src_valid

    # Gate 1: similarity threshold (-inf, i.e. "no survivor", always fails).
    ok = valid & (sim >= config.similarity_threshold)
    after_threshold = ok
    # Gate 2: merge fraction, kvpress's quantile rule, per head over the candidates.
    if config.merge_fraction < 1.0:
        ok = ok & (sim >= _candidate_quantile(sim, ok, 1.0 - config.merge_fraction))
    after_fraction = ok

    src_norm = src_values.float().norm(dim=-1)  # (B, H, E)
    dst_norm = dst_values.float().norm(dim=-1).gather(2, target)  # norm of each source's target
    w = sim.clamp(0.0, 1.0)
    # Gate 3: estimated merge error ‖v_i‖(1−w)/(1+w).
    if config.merge_error_gate > 0:
        ok = ok & (src_norm * (1 - w) / (1 + w) <= config.merge_error_gate)
    after_error = ok
    # Gate 4: per-survivor cap, the most similar sources first.
    if config.max_merge_per_token > 0:
        ok = ok & (_rank_within_target(sim, target, ok, K) < config.max_merge_per_token)

    if config.value_norm_weighting:
        w = w * src_norm / (src_norm + dst_norm + _EPS)
    w = torch.where(ok, w, torch.zeros_like(w))

    weight_sum = torch.zeros(B, H, K, dtype=torch.float32, device=w.device).scatter_add_(2, target, w)
    denom = (1.0 + weight_sum).unsqueeze(-1)
    target_d = target.unsqueeze(-1).expand(-1, -1, -1, D)

    def blend(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        # copy=True: for float32 input .float() would alias the caller's tensor
        acc = dst.to(torch.float32, copy=True).scatter_add_(2, target_d, w.unsqueeze(-1) * src.float())
        return (acc / denom).to(dst.dtype)

    values = blend(dst_values, src_values)
    keys = blend(dst_keys, src_keys) if config.merge_keys else dst_keys

    stats = None
    if with_stats:
        merged = ok & (w > 0)
        absorbed = torch.zeros(B, H, K, dtype=torch.long, device=w.device)
        absorbed.scatter_add_(2, target, merged.long())
        count = lambda m: m.sum(-1)  # noqa: E731
        stats = MergeStats(
            evicted=count(valid),
            merged=count(merged),
            gated_threshold=count(valid & ~after_threshold),
            gated_fraction=count(after_threshold & ~after_fraction),
            gated_error=count(after_fraction & ~after_error),
            gated_cap=count(after_error & ~ok),
            zero_weight=count(ok & (w <= 0)),
            similarity_sum=torch.where(merged, sim, 0.0).sum(-1),
            similarity_min=torch.where(merged, sim, float("inf")).amin(-1),
            max_absorbed=absorbed.amax(-1),
        )
    return keys, values, stats


def merge_uniform(
    keys: torch.Tensor,
    values: torch.Tensor,
    kept_indices: torch.Tensor,
    config: MergeConfig,
    with_stats: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, MergeStats | None]:
    """Uniform-budget kernel: merge the evicted tokens into the kept ones.

    Parameters
    ----------
    keys, values: ``(B, H, L, D)`` the full cache of one layer.
    kept_indices: ``(B, H, n_kept)`` int64 positions to keep (distinct per head), in the
        order the output should have (e.g. ``scores.topk(n_kept).indices``).
    config: merge parameters.

    Returns
    -------
    ``(kept_keys, kept_values, stats)`` with ``kept_*`` of shape ``(B, H, n_kept, D)``.
    """
    _check_cache(keys, values)
    B, H, L, D = keys.shape
    if kept_indices.dim() != 3 or tuple(kept_indices.shape[:2]) != (B, H) or kept_indices.shape[2] > L:
        raise ValueError(
            f"kept_indices must have shape (B, H, n_kept) = ({B}, {H}, <= {L}), got {tuple(kept_indices.shape)}"
        )
    n_kept = kept_indices.shape[2]
    gather = lambda x, idx: x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, D))  # noqa: E731
    dst_keys, dst_values = gather(keys, kept_indices), gather(values, kept_indices)
    evicted = torch.ones(B, H, L, dtype=torch.bool, device=keys.device).scatter_(2, kept_indices, False)
    n_evict = L - n_kept
    if int(evicted.sum()) != B * H * n_evict:
        raise ValueError("kept_indices must hold distinct positions within each head")
    # Evicted positions in ascending order: nonzero() walks the mask row by row.
    evict_idx = evicted.nonzero()[:, 2].view(B, H, n_evict)
    return merge_into(
        gather(keys, evict_idx),
        gather(values, evict_idx),
        dst_keys,
        dst_values,
        config,
        with_stats=with_stats,
        block_bytes=block_bytes,
    )


def merge_adaptive(
    keys: torch.Tensor,
    values: torch.Tensor,
    evicted: torch.Tensor,
    config: MergeConfig,
    survivors: torch.Tensor | None = None,
    with_stats: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, MergeStats | None]:
    """Adaptive-budget kernel: per-head eviction counts, full-length tensors in and out.

    Parameters
    ----------
    keys, values: ``(B, H, L, D)`` the full cache of one layer.
    evicted: ``(B, H, L)`` bool, tokens to merge away; the count may differ per head.
    config: merge parameters.
    survivors: ``(B, H, L)`` bool or None (= ``~evicted``): tokens that may absorb. DMS passes
        the tokens masked by earlier steps as neither source nor survivor.

    Returns
    -------
    ``(keys, values, stats)``: ``(B, H, L, D)`` copies where surviving positions hold the merged
    tokens and every other position is unchanged (``keys`` is the input unless ``merge_keys``).
    """
    _check_cache(keys, values)
    B, H, L, D = keys.shape
    if evicted.shape != (B, H, L) or evicted.dtype != torch.bool:
        raise ValueError(
            f"evicted must be a bool tensor of shape {(B, H, L)}, got {evicted.dtype} {tuple(evicted.shape)}"
        )
    if survivors is None:
        survivors = ~evicted
    elif survivors.shape != (B, H, L) or survivors.dtype != torch.bool:
        raise ValueError(f"survivors must be a bool tensor of shape {(B, H, L)}")
    elif bool((survivors & evicted).any()):
        raise ValueError("a token cannot be both evicted and a survivor")
    if not bool(evicted.any()):
        return keys, values, (_empty_stats(B, H, 0, keys.device) if with_stats else None)

    # Pad each head's sources and survivors to the largest count, in position order.
    src_idx, src_valid = _packed_positions(evicted)
    dst_idx, dst_valid = _packed_positions(survivors)
    gather = lambda x, idx: x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, D))  # noqa: E731
    new_keys, new_values, stats = merge_into(
        gather(keys, src_idx),
        gather(values, src_idx),
        gather(keys, dst_idx),
        gather(values, dst_idx),
        config,
        src_valid=src_valid,
        dst_valid=dst_valid,
        with_stats=with_stats,
        block_bytes=block_bytes,
    )
    # Padded destination slots hold unchanged copies of distinct positions: writing them back
    # is a no-op, so one scatter covers every head.
    scatter_idx = dst_idx.unsqueeze(-1).expand(-1, -1, -1, D)
    out_values = values.scatter(2, scatter_idx, new_values)
    out_keys = keys.scatter(2, scatter_idx, new_keys) if config.merge_keys else keys
    return out_keys, out_values, stats


def _unit(x: torch.Tensor) -> torch.Tensor:
    """float32 copy of ``x`` scaled to unit norm along the last axis (zero stays zero)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=_EPS)


def _check_cache(keys: torch.Tensor, values: torch.Tensor) -> None:
    if keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(
            f"keys and values must both be (B, H, L, D) of equal shape, got {tuple(keys.shape)} "
            f"and {tuple(values.shape)}"
        )


def _packed_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions where ``mask`` is set, first and ascending, padded to the largest count.

    ``mask``: ``(B, H, L)`` bool. Returns ``(positions, valid)`` of shape ``(B, H, N)``; the
    padding positions are distinct positions where ``mask`` is not set.
    """
    n = int(mask.sum(-1).max())
    order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)[..., :n]
    valid = torch.arange(n, device=mask.device) < mask.sum(-1, keepdim=True)
    return order, valid


def _candidate_quantile(sim: torch.Tensor, candidate: torch.Tensor, q: float) -> torch.Tensor:
    """Per-head q-quantile (linear interpolation) of ``sim`` over the candidates, ``(B, H, 1)``.

    Heads without candidates get +inf (nothing passes). Only the two order statistics that
    bracket the quantile are read, so this is one sort.
    """
    n = candidate.sum(-1, keepdim=True)  # (B, H, 1)
    ranked = torch.where(candidate, sim, float("inf")).sort(dim=-1).values  # candidates first
    # Rank and interpolation in float32 with lerp, as torch.quantile does, so that with every
    # source a candidate the result matches kvpress's MergingPress bit for bit.
    pos = torch.tensor(q, dtype=torch.float32, device=sim.device) * (n - 1).clamp(min=0).float()
    lo, hi = pos.floor(), pos.ceil()
    a, b = ranked.gather(-1, lo.long()), ranked.gather(-1, hi.long())
    quantile = torch.lerp(a, b, pos - lo)
    return torch.where(n > 0, quantile, float("inf"))


def _rank_within_target(sim: torch.Tensor, target: torch.Tensor, ok: torch.Tensor, K: int) -> torch.Tensor:
    """For each source, how many more-similar sources share its target (0 = the most similar).

    Sources with ``ok`` False are put in a dummy bin K and do not count. Ties in similarity go
    to the earlier source (stable sorts). All ``(B, H, E)``.
    """
    E = sim.shape[-1]
    bins = torch.where(ok, target, K)
    by_sim = torch.argsort(torch.where(ok, sim, float("-inf")), dim=-1, descending=True, stable=True)
    bins_by_sim = bins.gather(-1, by_sim)
    by_bin = torch.argsort(bins_by_sim, dim=-1, stable=True)
    order = by_sim.gather(-1, by_bin)  # sources grouped by target, most similar first
    sorted_bins = bins_by_sim.gather(-1, by_bin)
    counts = torch.zeros(*bins.shape[:-1], K + 1, dtype=torch.long, device=sim.device)
    counts.scatter_add_(-1, bins, torch.ones_like(bins))
    starts = counts.cumsum(-1) - counts
    rank_sorted = torch.arange(E, device=sim.device) - starts.gather(-1, sorted_bins)
    return torch.empty_like(rank_sorted).scatter_(-1, order, rank_sorted)


def _empty_stats(B: int, H: int, E: int, device: torch.device) -> MergeStats:
    """Stats of a call that merged nothing: E sources and no survivor to route them to."""
    zeros = torch.zeros(B, H, dtype=torch.long, device=device)
    return MergeStats(
        evicted=zeros + E,
        merged=zeros,
        gated_threshold=zeros + E,  # no survivor: similarity -inf fails the threshold
        gated_fraction=zeros,
        gated_error=zeros,
        gated_cap=zeros,
        zero_weight=zeros,
        similarity_sum=torch.zeros(B, H, device=device),
        similarity_min=torch.full((B, H), float("inf"), device=device),
        max_absorbed=zeros,
    )
