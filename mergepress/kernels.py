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

The nearest-survivor search runs in tiles (sources x survivors, one head at a time) so the
similarity held at once stays under ``block_bytes`` whatever the context length (on CPU the
tile is also kept about cache-sized); ties go to the first survivor in the destination order,
exactly as one unblocked ``max`` would. Each head searches only its own sources and survivors,
so unequal per-head budgets cost only their own work. Besides the outputs, the kernels hold one
float32 copy of the survivors' unit keys and ``(B, H, L)``-sized bookkeeping: sources are read
from the cache tile by tile, never gathered whole.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

_EPS = 1e-6  # norm floor: zero-norm keys/values get similarity 0 and weight 0, never NaN
DEFAULT_BLOCK_BYTES = 256 * 2**20  # similarity tile budget of the search (CPU: see _CPU_TILE_BYTES)


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
    B, H, E, _ = src_keys.shape
    K = dst_keys.shape[2]
    n_dst, bias = _prefix_counts(dst_valid, B, H, K)
    if E == 0 or K == 0:
        n_dst = [0] * (B * H)
    sim, idx = _search(src_keys, None, _unit_t(dst_keys), [E] * (B * H), n_dst, bias, block_bytes)
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
    n_src, _ = _prefix_counts(src_valid, B, H, E)  # sources past a head's count are not searched
    n_dst, bias = _prefix_counts(dst_valid, B, H, K)
    sim, target = _search(src_keys, None, _unit_t(dst_keys), n_src, n_dst, bias, block_bytes)
    sim, target = sim.view(B, H, E), target.view(B, H, E)
    src_norm = _norms(src_values, block_bytes)
    dst_norm = _norms(dst_values, block_bytes).gather(2, target)
    w, stats = _weights(sim, target, src_valid, src_norm, dst_norm, config, K, with_stats)
    # The accumulators are float32 copies: for float32 input .float() would alias the caller's tensor.
    values = _blend(dst_values.to(torch.float32, copy=True), target, w, src_values, None, block_bytes)
    keys = dst_keys
    if config.merge_keys:
        keys = _blend(dst_keys.to(torch.float32, copy=True), target, w, src_keys, None, block_bytes)
        keys = keys.to(dst_keys.dtype)
    return keys, values.to(dst_values.dtype), stats


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
    K = kept_indices.shape[2]
    E = L - K
    dst_keys, dst_values = _rows(keys, kept_indices), _rows(values, kept_indices)
    evicted = torch.ones(B, H, L, dtype=torch.bool, device=keys.device).scatter_(2, kept_indices, False)
    if int(evicted.sum()) != B * H * E:
        raise ValueError("kept_indices must hold distinct positions within each head")
    if E == 0 or K == 0:
        return dst_keys, dst_values, (_empty_stats(B, H, E, keys.device) if with_stats else None)
    # Evicted positions in ascending order: nonzero() walks the mask row by row.
    evict_idx = evicted.nonzero()[:, 2].view(B, H, E)
    del evicted
    # Sources are read from the cache block by block; only the survivors are gathered whole.
    sim, target = _search(keys, evict_idx, _unit_t(dst_keys), [E] * (B * H), [K] * (B * H), None, block_bytes)
    sim, target = sim.view(B, H, E), target.view(B, H, E)
    norm = _norms(values, block_bytes)  # (B, H, L): every position is a source or a survivor
    src_norm, dst_norm = norm.gather(2, evict_idx), norm.gather(2, kept_indices.gather(2, target))
    w, stats = _weights(sim, target, None, src_norm, dst_norm, config, K, with_stats)
    # The gathered survivors are ours: float32 ones accumulate in place.
    out_values = _blend(dst_values.float(), target, w, values, evict_idx, block_bytes).to(values.dtype)
    out_keys = dst_keys
    if config.merge_keys:
        out_keys = _blend(dst_keys.float(), target, w, keys, evict_idx, block_bytes).to(keys.dtype)
    return out_keys, out_values, stats


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
    n_src, n_dst = evicted.sum(-1), survivors.sum(-1)  # (B, H)
    if not bool(((n_src > 0) & (n_dst > 0)).any()):  # no head has both a source and a survivor
        return keys, values, (_empty_stats(B, H, n_src, keys.device) if with_stats else None)

    # Each head's sources and survivors in position order, padded to the largest count. The
    # padding is never searched (per-head counts), so unequal budgets cost only their own work.
    src_idx, src_valid = _packed_positions(evicted, n_src)
    dst_idx, _ = _packed_positions(survivors, n_dst)
    E, K = src_idx.shape[2], dst_idx.shape[2]
    sim, target = _search(
        keys, src_idx, _unit_t(keys, dst_idx), n_src.flatten().tolist(), n_dst.flatten().tolist(), None, block_bytes
    )
    sim, target = sim.view(B, H, E), target.view(B, H, E)
    position = dst_idx.gather(2, target)  # cache position of each source's survivor
    norm = _norms(values, block_bytes)  # (B, H, L)
    src_norm, dst_norm = norm.gather(2, src_idx), norm.gather(2, position)
    w, stats = _weights(sim, target, src_valid, src_norm, dst_norm, config, K, with_stats)
    # Accumulate straight into a full-length copy: positions that absorb nothing are divided by
    # exactly 1, so evicted and masked positions come out bit for bit unchanged.
    out_values = _blend(values.to(torch.float32, copy=True), position, w, values, src_idx, block_bytes)
    out_keys = keys
    if config.merge_keys:
        out_keys = _blend(keys.to(torch.float32, copy=True), position, w, keys, src_idx, block_bytes).to(keys.dtype)
    return out_keys, out_values.to(values.dtype), stats


# --- internals ---------------------------------------------------------------------------------

# On CPU the similarity tile is kept about cache-sized whatever block_bytes allows: the matmul
# writes it and the argmax reads it back from cache, and no fresh pages are faulted in. Other
# devices use the whole budget (fewer, larger launches).
_CPU_TILE_BYTES = 8 * 2**20
_MIN_TILE_ROWS = 1024  # fewer rows per matmul re-packs the survivors too often: tile K instead
_ARGMAX_CHUNKS = 64  # strided chunks per row in _row_max: enough for amax to vectorise


def _search(
    src: torch.Tensor,
    src_index: torch.Tensor | None,
    unit_t: torch.Tensor,
    n_src: list[int],
    n_dst: list[int],
    bias: torch.Tensor | None,
    block_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked nearest-survivor search, one (batch, head) at a time.

    Parameters
    ----------
    src: ``(B, H, N, D)`` source keys, or the whole cache's keys when ``src_index`` is given.
    src_index: ``(B, H, E)`` int64 rows of ``src`` that are the sources, or None (``E = N``).
    unit_t: ``(B·H, D, K)`` float32 unit-norm survivor keys, transposed (see :func:`_unit_t`).
    n_src, n_dst: per (batch·head), how many leading sources/survivors are valid; the rest are
        not searched (their sources get ``-inf`` and index 0).
    bias: ``(B·H, K)`` float32, ``-inf`` on invalid survivors (for masks that are not a
        prefix), or None.

    Returns
    -------
    ``(similarity, index)`` of shape ``(B·H, E)``: ties go to the first survivor, since
    :func:`_row_max` picks the first maximum within a tile and later tiles must be strictly better.
    """
    BH, _, K = unit_t.shape
    src = src.flatten(0, 1)
    rows_of = None if src_index is None else src_index.flatten(0, 1)
    E = src.shape[1] if rows_of is None else rows_of.shape[1]
    sim = torch.full((BH, E), float("-inf"), dtype=torch.float32, device=src.device)
    idx = torch.zeros(BH, E, dtype=torch.long, device=src.device)
    e_max, k_max = max(n_src, default=0), max(n_dst, default=0)
    if e_max == 0 or k_max == 0:
        return sim, idx
    budget = min(block_bytes, _CPU_TILE_BYTES) if src.device.type == "cpu" else block_bytes

    padded, work = BH * e_max * k_max, sum(e * k for e, k in zip(n_src, n_dst))
    if 4 * padded <= budget and padded <= 1.25 * work:  # small, even problem: one block for all heads
        part = src[:, :e_max] if rows_of is None else _rows(src[None], rows_of[None, :, :e_max])[0]
        block = torch.bmm(_unit(part), unit_t[:, :, :k_max])  # (BH, e, k)
        if bias is not None:
            block += bias[:, None, :k_max]
        if min(n_dst) < k_max:  # survivors past a head's count are padding
            past = torch.arange(k_max, device=src.device) >= torch.tensor(n_dst, device=src.device)[:, None]
            block.masked_fill_(past[:, None, :], float("-inf"))
        m, j = _row_max(block.view(BH * e_max, k_max))
        sim[:, :e_max], idx[:, :e_max] = m.view(BH, e_max), j.view(BH, e_max)
        if min(n_src) < e_max:  # sources past a head's count are not searched
            past = torch.arange(E, device=src.device) >= torch.tensor(n_src, device=src.device)[:, None]
            sim.masked_fill_(past, float("-inf"))
            idx.masked_fill_(past, 0)
        return sim, idx

    rows, cols = _tile_shape(e_max, k_max, budget)
    buffer = torch.empty(rows * cols, dtype=torch.float32, device=src.device)
    for h in range(BH):
        if n_dst[h] == 0:
            continue
        for e0 in range(0, n_src[h], rows):
            e1 = min(n_src[h], e0 + rows)
            part = src[h, e0:e1] if rows_of is None else src[h].index_select(0, rows_of[h, e0:e1])
            query = _unit(part)  # (e, D)
            best, arg = sim[h, e0:e1], idx[h, e0:e1]
            for k0 in range(0, n_dst[h], cols):
                k1 = min(n_dst[h], k0 + cols)
                block = buffer[: (e1 - e0) * (k1 - k0)].view(e1 - e0, k1 - k0)
                torch.mm(query, unit_t[h, :, k0:k1], out=block)
                if bias is not None:
                    block += bias[h, k0:k1]
                m, j = _row_max(block)
                if k0 == 0:
                    best.copy_(m)
                    arg.copy_(j)
                else:
                    better = m > best  # strict: an earlier tile keeps its ties
                    torch.where(better, m, best, out=best)
                    torch.where(better, j + k0, arg, out=arg)
    return sim, idx


def _tile_shape(E: int, K: int, budget: int) -> tuple[int, int]:
    """(rows, cols) of a float32 similarity tile of at most ``budget`` bytes (at least 1 x 1).

    Whole survivor rows when ``_MIN_TILE_ROWS`` of them fit, otherwise the K axis is tiled too.
    """
    min_rows = max(1, min(E, _MIN_TILE_ROWS))
    cols = K if 4 * K * min_rows <= budget else max(1, budget // (4 * min_rows))
    rows = max(1, min(E, budget // (4 * cols)))
    return rows, cols


def _row_max(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``block.max(dim=-1)`` of a 2-D float32 block: the max and its first index, per row.

    On CPU, ``max(dim)`` is a scalar loop that also enters a parallel region however small the
    block; ``argmax`` (first index on ties too) does not, and ``amax`` is vectorised. So each
    row is cut into ``s`` strided chunks (chunk j holds columns j, j + s, j + 2s, ...), reduced
    with ``amax`` (vectorised along the s chunks); the first chunk holding the row max is
    searched for its first index. Only when the max sits in more than one chunk (exact ties,
    NaN) can the first index by position lie elsewhere: those rows are redone whole.
    """
    if block.device.type != "cpu":
        return block.max(dim=-1)
    r, c = block.shape
    s = _ARGMAX_CHUNKS
    g, tail = divmod(c, s)
    if g < 4:
        idx = block.argmax(dim=-1)
        return block.gather(1, idx.unsqueeze(1)).squeeze(1), idx
    chunk_max = block[:, : g * s].view(r, g, s).amax(1)  # (r, s)
    j = chunk_max.argmax(dim=-1)  # first chunk holding the max
    m = chunk_max.gather(1, j.unsqueeze(1)).squeeze(1)
    offsets = torch.arange(0, g * s, s, device=block.device)  # (g,) columns of chunk 0
    idx = j + s * block.gather(1, j.unsqueeze(1) + offsets).argmax(dim=-1)
    redo = (chunk_max == m.unsqueeze(1)).sum(1) != 1
    if tail:  # the last c % s columns win only when strictly larger (or NaN, which max propagates)
        t = block[:, g * s :].argmax(dim=-1)
        tm = block[:, g * s :].gather(1, t.unsqueeze(1)).squeeze(1)
        better = (tm > m) | (tm.isnan() & ~m.isnan())
        m, idx = torch.where(better, tm, m), torch.where(better, t + g * s, idx)
        redo &= ~better
    if bool(redo.any()):
        rows = redo.nonzero().squeeze(1)
        idx[rows] = block[rows].argmax(dim=-1)
        m[rows] = block[rows].gather(1, idx[rows].unsqueeze(1)).squeeze(1)
    return m, idx


def _unit_t(keys: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Unit-norm float32 keys, transposed for the search: ``(B·H, D, K)``.

    ``keys`` is ``(B, H, N, D)``; ``index`` ``(B, H, K)`` picks the rows (all N if None). One head
    at a time, so the only temporaries are ``(K, D)``.
    """
    B, H, N, D = keys.shape
    flat = keys.flatten(0, 1)
    rows_of = None if index is None else index.flatten(0, 1)
    K = N if rows_of is None else rows_of.shape[1]
    out = torch.empty(B * H, D, K, dtype=torch.float32, device=keys.device)
    for h in range(B * H):
        rows = flat[h] if rows_of is None else flat[h].index_select(0, rows_of[h])
        out[h].copy_(_unit(rows).t())
    return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    """float32 copy of ``x`` scaled to unit norm along the last axis (zero stays zero)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=_EPS)


def _norms(x: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """float32 L2 norms of ``(B, H, N, D)`` along D, ``(B, H, N)``; half inputs upcast in blocks."""
    if x.dtype == torch.float32:
        return x.norm(dim=-1)
    B, H, N, D = x.shape
    step = max(1, block_bytes // (4 * B * H * D))
    return torch.cat([x[:, :, i : i + step].float().norm(dim=-1) for i in range(0, N, step)], dim=2)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (B, H, N, D)`` at rows ``index (B, H, M)``: ``(B, H, M, D)``.

    Whole rows are copied with ``index_select`` (several times faster than ``gather`` on CPU).
    """
    B, H, N, D = x.shape
    if not x.is_contiguous():
        return x.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, D))
    flat = index + N * torch.arange(B * H, device=index.device).view(B, H, 1)
    return x.view(B * H * N, D).index_select(0, flat.flatten()).view(B, H, -1, D)


def _prefix_counts(valid: torch.Tensor | None, B: int, H: int, N: int) -> tuple[list[int], torch.Tensor | None]:
    """Per (batch·head) number of leading valid entries of ``valid (B, H, N)``, and a bias.

    When ``valid`` is a prefix mask (all None, or True then False per head) the counts say it all
    and the bias is None. Otherwise the counts are N and the bias ``(B·H, N)`` is ``-inf`` on the
    invalid entries.
    """
    if valid is None:
        return [N] * (B * H), None
    count = valid.sum(-1, keepdim=True)
    if bool((valid == (torch.arange(N, device=valid.device) < count)).all()):
        return count.flatten().tolist(), None
    bias = torch.zeros(B * H, N, dtype=torch.float32, device=valid.device)
    return [N] * (B * H), bias.masked_fill_(~valid.flatten(0, 1), float("-inf"))


def _weights(
    sim: torch.Tensor,
    target: torch.Tensor,
    src_valid: torch.Tensor | None,
    src_norm: torch.Tensor,
    dst_norm: torch.Tensor,
    config: MergeConfig,
    K: int,
    with_stats: bool,
) -> tuple[torch.Tensor, MergeStats | None]:
    """Apply the gates in order; blend weight of each source (0 = not merged), and the stats.

    All tensors ``(B, H, E)``: ``dst_norm`` is the value norm of each source's target survivor.
    """
    valid = torch.ones_like(sim, dtype=torch.bool) if src_valid is None else src_valid
    # Gate 1: similarity threshold (-inf, i.e. "no survivor", always fails).
    ok = valid & (sim >= config.similarity_threshold)
    after_threshold = ok
    # Gate 2: merge fraction, kvpress's quantile rule, per head over the candidates.
    if config.merge_fraction < 1.0:
        ok = ok & (sim >= _candidate_quantile(sim, ok, 1.0 - config.merge_fraction))
    after_fraction = ok
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

    if not with_stats:
        return w, None
    B, H, _ = sim.shape
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
    return w, stats


def _blend(
    acc: torch.Tensor,
    target: torch.Tensor,
    w: torch.Tensor,
    src: torch.Tensor,
    src_index: torch.Tensor | None,
    block_bytes: int,
) -> torch.Tensor:
    """``acc[t] ← (acc[t] + Σ_{i→t} w_i src_i) / (1 + Σ_{i→t} w_i)`` in place, and return ``acc``.

    ``acc (B, H, M, D)`` float32 (owned by the caller); ``target, w (B, H, E)``: row of ``acc``
    and weight of each source; ``src (B, H, E, D)``, or the whole cache with ``src_index
    (B, H, E)`` giving each source's row. Sources are read in blocks of at most ``block_bytes``.
    Rows that absorb nothing are divided by exactly 1; with no weight at all, nothing is done.
    """
    if not bool((w > 0).any()):
        return acc
    B, H, M, D = acc.shape
    E = target.shape[2]
    # One index_add over the flattened heads: rows of D added in source order, like scatter_add.
    rows = acc.view(B * H * M, D)
    target = target + M * torch.arange(B * H, device=target.device).view(B, H, 1)
    budget = min(block_bytes, _CPU_TILE_BYTES) if acc.device.type == "cpu" else block_bytes
    step = max(1, budget // (8 * B * H * D))
    for e0 in range(0, E, step):
        e1 = min(E, e0 + step)
        part = src[:, :, e0:e1] if src_index is None else _rows(src, src_index[:, :, e0:e1])
        # cast: a float64 cache would otherwise promote the product past the float32 accumulator
        weighted = w[:, :, e0:e1].unsqueeze(-1) * part.to(rows.dtype)
        rows.index_add_(0, target[:, :, e0:e1].flatten(), weighted.view(-1, D))
    weight_sum = torch.zeros(B * H * M, dtype=torch.float32, device=acc.device).index_add_(
        0, target.flatten(), w.flatten()
    )
    return acc.div_((1.0 + weight_sum).view(B, H, M, 1))


def _check_cache(keys: torch.Tensor, values: torch.Tensor) -> None:
    if keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(
            f"keys and values must both be (B, H, L, D) of equal shape, got {tuple(keys.shape)} "
            f"and {tuple(values.shape)}"
        )


def _packed_positions(mask: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions where ``mask`` is set, first and ascending, padded to the largest count.

    ``mask``: ``(B, H, L)`` bool, ``count`` its ``(B, H)`` sum. Returns ``(positions, valid)`` of
    shape ``(B, H, N)``; the padding positions are distinct positions where ``mask`` is not set.
    """
    n = int(count.max())
    order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)[..., :n]
    valid = torch.arange(n, device=mask.device) < count.unsqueeze(-1)
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


def _empty_stats(B: int, H: int, E: int | torch.Tensor, device: torch.device) -> MergeStats:
    """Stats of a call that merged nothing: E sources (int or ``(B, H)``), no survivor to route them to."""
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
