"""The perturbation bound of merge-on-evict: exact closed forms, and their measurement on real attention.

Notation (``notebooks/02_perturbation_bound.ipynb`` derives everything here). One KV head holds
``L`` cached tokens with keys ``k_k`` and values ``v_k`` (head dim ``D``); a query ``q`` has logits
``z_k = scale · q·k_k``, attention weights ``a = softmax(z)`` and output ``O = Σ_k a_k v_k``.
Evicting the set ``E`` (the survivors' weights are renormalised) and merging each ``i ∈ E`` into
a survivor ``j(i)`` with *share* ``μ_i`` — the survivor's value becomes
``v_j' = (1 − Σ_{i→j} μ_i) v_j + Σ_{i→j} μ_i v_i`` — change the output by exactly::

    ΔO_evict = Σ_{i∈E} a_i (O − v_i) / (1 − A),                         A = Σ_{i∈E} a_i
    ΔO_merge = ΔO_evict + Σ_{i∈E} a_{j(i)} μ_i (v_i − v_{j(i)}) / (1 − A)   (keys unchanged)

The library's blend weight ``w_i`` (cosine similarity, times the value-norm factor) gives the
share ``μ_i = w_i / (1 + W_j)`` with ``W_j = Σ_{i→j} w_i``; one token alone gets ``w / (1 + w)``.

Two halves:

* closed forms on logits: :func:`attention_output`, :func:`evict_delta`, :func:`merge_delta`,
  :func:`pair_deltas`, :func:`pair_norms`, :func:`optimal_share`, :func:`shares_from_weights`,
  :func:`cap_shares`, the scalar :func:`seed_bound`, :func:`ideal_ratio`, :func:`dilution_factor`,
  and :func:`attend`, the plain attention they are checked against;
* measurement on a real model: :func:`record_layers` prefills a context and records, per layer,
  the post-RoPE queries of the tokens that follow it, the cached keys and values and the scores of
  kvpress scorer presses; :func:`merge_routes` reproduces the library's routing and weights;
  :func:`pair_ratios` and :func:`split_errors` measure per-token ratios and whole-split errors.

The closed forms and measurements compute in float64. Batched tensors follow kvpress: ``(B, H, L, D)`` for a cache,
``(B, H, Q, L)`` for logits of ``Q`` queries per KV head (GQA: the queries of every query head
that shares the KV head, see :meth:`LayerRecord.grouped_queries`), ``(B, H, E)`` for per-source
quantities; any leading dimensions broadcast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from kvpress import ScorerPress
from kvpress.utils import compute_n_kept, extract_keys_and_values, get_prerope_query_states
from torch import nn
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mergepress.kernels import MergeConfig, merge_uniform, nearest_survivor

_EPS = 1e-6  # the kernels' norm floor in the value-norm factor
DEFAULT_CONFIG = MergeConfig()  # the library defaults (frozen dataclass: safe as an argument default)

# --------------------------------------------------------------------------------------------
# Scalar forms of the bound
# --------------------------------------------------------------------------------------------


def seed_bound(weight: torch.Tensor | float) -> torch.Tensor | float:
    """The seed's claimed ratio bound ``1 / (1 + w)``."""
    return 1.0 / (1.0 + weight)


def ideal_ratio(weight: torch.Tensor | float, attention_ratio: torch.Tensor | float) -> torch.Tensor | float:
    """Exact ``‖ΔO_merge‖ / ‖ΔO_evict‖`` for one merged token when the survivor's value equals the output.

    With ``v_j = O`` and ``r = a_j / a_i`` the ratio is ``|1 − r · w / (1 + w)|``: ``1 / (1 + w)``
    at ``r = 1`` (the seed's claim, with equality), above it for ``r < 1`` and for ``r > 1 + 2/w``.
    """
    x = 1.0 - attention_ratio * weight / (1.0 + weight)
    return x.abs() if isinstance(x, torch.Tensor) else abs(x)


def dilution_factor(weight: torch.Tensor | float, m: torch.Tensor | int) -> torch.Tensor | float:
    """Ratio per source when ``m`` tokens of weight ``w`` merge into one survivor: ``(1 + (m−1)w) / (1 + m w)``.

    Exact under the same assumptions that give ``1 / (1 + w)`` for one token (each source as attended
    as the survivor, survivor value equal to the output); equals ``1 / (1 + w)`` only for ``m = 1``.
    """
    return (1.0 + (m - 1) * weight) / (1.0 + m * weight)


# --------------------------------------------------------------------------------------------
# Closed forms on logits
# --------------------------------------------------------------------------------------------


def attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain softmax attention in float64, the direct computation the closed forms are checked against.

    ``queries (..., Q, D)``, ``keys, values (..., L, D)`` -> output ``(..., Q, D)``.
    """
    logits = scale * queries.double() @ keys.double().transpose(-1, -2)
    return torch.softmax(logits, dim=-1) @ values.double()


def attention_output(logits: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention weights and output of the full cache.

    ``logits (..., Q, L)``, ``values (..., L, D)`` -> ``(a (..., Q, L), O (..., Q, D))``, float64.
    """
    a = torch.softmax(logits.double(), dim=-1)
    return a, a @ values.double()


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (..., L, D)`` at positions ``idx (..., E)`` -> ``(..., E, D)``."""
    idx = idx.expand(*x.shape[:-2], idx.shape[-1])
    return x.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def _gather_weights(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``a (..., Q, L)`` at positions ``idx (..., E)`` (shared by every query) -> ``(..., Q, E)``."""
    idx = idx.unsqueeze(-2).expand(*a.shape[:-1], idx.shape[-1])
    return a.gather(-1, idx)


def evict_delta(logits: torch.Tensor, values: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``ΔO_evict`` for hard eviction of the tokens ``src`` (renormalised survivors), closed form.

    ``logits (..., Q, L)``, ``values (..., L, D)``, ``src (..., E)`` distinct positions per head.
    Returns ``Σ_i a_i (O − v_i) / (1 − A)``, shape ``(..., Q, D)``.
    """
    a, out = attention_output(logits, values)
    a_src = _gather_weights(a, src)  # (..., Q, E)
    total = a_src.sum(-1, keepdim=True)
    return (total * out - a_src @ _gather_tokens(values.double(), src)) / (1.0 - total)


def merge_delta(
    logits: torch.Tensor,
    values: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    shares: torch.Tensor,
    merge_keys: bool = False,
) -> torch.Tensor:
    """``ΔO_merge`` when every ``src[e]`` is merged into ``dst[e]`` with share ``shares[e]``, closed form.

    Parameters
    ----------
    logits: ``(..., Q, L)``; values: ``(..., L, D)``.
    src: ``(..., E)`` evicted positions (distinct); dst: ``(..., E)`` their survivors (not in ``src``).
    shares: ``(..., E)`` the share ``μ`` of each source in its survivor's blend (0 = plain eviction);
        the shares routed to one survivor must sum to at most 1.
    merge_keys: the survivors' keys are blended with the same shares. Logits are linear in the key,
        so the survivor's logit becomes ``z_j + Σ_{i→j} μ_i (z_i − z_j)`` and no key is needed.

    Returns
    -------
    ``O' − O`` of shape ``(..., Q, D)``. Keys unchanged: ``ΔO_evict + Σ_i a_j μ_i (v_i − v_j) / (1 − A)``.
    """
    v = values.double()
    mu = shares.double()
    if not merge_keys:
        a, _ = attention_output(logits, values)
        total = _gather_weights(a, src).sum(-1, keepdim=True)
        moved = (_gather_weights(a, dst) * mu.unsqueeze(-2)) @ (_gather_tokens(v, src) - _gather_tokens(v, dst))
        return evict_delta(logits, values, src) + moved / (1.0 - total)
    z = logits.double()
    _, out = attention_output(z, v)
    L = z.shape[-1]
    lead = torch.broadcast_shapes(z.shape[:-2], v.shape[:-2], src.shape[:-1], dst.shape[:-1], mu.shape[:-1])
    src, dst, mu = (t.expand(*lead, t.shape[-1]) for t in (src, dst, mu))
    v = v.expand(*lead, *v.shape[-2:])
    z = z.expand(*lead, *z.shape[-2:])
    # Survivors' logits and values after the blend (scatter-add of every source's pull).
    dz = _gather_weights(z, src) - _gather_weights(z, dst)  # (..., Q, E)
    dst_q = dst.unsqueeze(-2).expand(*z.shape[:-1], dst.shape[-1])
    z_new = z.scatter_add(-1, dst_q, mu.unsqueeze(-2) * dz)
    pull = mu.unsqueeze(-1) * (_gather_tokens(v, src) - _gather_tokens(v, dst))  # (..., E, D)
    v_new = v.scatter_add(-2, dst.unsqueeze(-1).expand(*dst.shape, v.shape[-1]), pull)
    gone = torch.zeros(*lead, L, dtype=torch.bool, device=z.device).scatter_(-1, src, True)
    z_new = z_new.masked_fill(gone.unsqueeze(-2), float("-inf"))
    return torch.softmax(z_new, dim=-1) @ v_new - out


def pair_deltas(
    logits: torch.Tensor,
    values: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    shares: torch.Tensor,
    merge_keys: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each evicted token in isolation: ``(ΔO_evict, ΔO_merge)`` of removing only ``src[e]``.

    Parameters as in :func:`merge_delta` (``dst`` may repeat: every pair is its own experiment).

    Returns
    -------
    Two ``(..., Q, E, D)`` tensors::

        ΔO_evict = a_i (O − v_i) / (1 − a_i)
        ΔO_merge = ΔO_evict + a_j μ (v_i − v_j) / (1 − a_i)                         (keys unchanged)
        ΔO_merge = (O − a_i v_i − a_j v_j + g v_j') / (1 − a_i − a_j + g) − O,  g = a_j (a_i/a_j)^μ  (merge_keys)

    With merged keys the survivor's weight ``g`` is the weighted *geometric* mean of ``a_j`` and ``a_i``.
    """
    v = values.double()
    a, out = attention_output(logits, v)
    a_i, a_j = _gather_weights(a, src).unsqueeze(-1), _gather_weights(a, dst).unsqueeze(-1)  # (..., Q, E, 1)
    v_i, v_j = _gather_tokens(v, src).unsqueeze(-3), _gather_tokens(v, dst).unsqueeze(-3)  # (..., 1, E, D)
    out = out.unsqueeze(-2)  # (..., Q, 1, D)
    mu = shares.double().unsqueeze(-1).unsqueeze(-3)  # (..., 1, E, 1)
    d_evict = a_i * (out - v_i) / (1.0 - a_i)
    if not merge_keys:
        return d_evict, d_evict + a_j * mu * (v_i - v_j) / (1.0 - a_i)
    z = logits.double()
    z_i, z_j = _gather_weights(z, src).unsqueeze(-1), _gather_weights(z, dst).unsqueeze(-1)
    g = a_j * torch.exp(mu * (z_i - z_j))
    v_new = v_j + mu * (v_i - v_j)
    merged = (out - a_i * v_i - a_j * v_j + g * v_new) / (1.0 - a_i - a_j + g)
    return d_evict, merged - out


def pair_norms(
    logits: torch.Tensor,
    values: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    shares: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖ΔO_evict‖, ‖ΔO_merge‖)`` of :func:`pair_deltas` (keys unchanged) without the ``(Q, E, D)`` tensors.

    Expands the squared norms into dot products (``O·v``, ``v_i·v_j``), so memory and time are
    ``O(Q·E)``. Shapes as in :func:`pair_deltas`; returns two ``(..., Q, E)`` tensors.
    """
    v = values.double()
    a, out = attention_output(logits, v)
    v_i, v_j = _gather_tokens(v, src), _gather_tokens(v, dst)  # (..., E, D)
    ov_i, ov_j = out @ v_i.transpose(-1, -2), out @ v_j.transpose(-1, -2)  # (..., Q, E)
    vi2, vij, vj2 = (v_i * v_i).sum(-1), (v_i * v_j).sum(-1), (v_j * v_j).sum(-1)  # (..., E)
    o2 = (out * out).sum(-1, keepdim=True)  # (..., Q, 1)
    uu = (o2 - 2 * ov_i + vi2.unsqueeze(-2)).clamp(min=0)  # ‖O − v_i‖²
    ud = ov_i - ov_j - vi2.unsqueeze(-2) + vij.unsqueeze(-2)  # (O − v_i)·(v_i − v_j)
    dd = (vi2 - 2 * vij + vj2).clamp(min=0).unsqueeze(-2)  # ‖v_i − v_j‖²
    a_i, a_j = _gather_weights(a, src), _gather_weights(a, dst)
    alpha = a_i / (1.0 - a_i)
    beta = a_j * shares.double().unsqueeze(-2) / (1.0 - a_i)
    evict = alpha * uu.sqrt()
    merge = (alpha**2 * uu + 2 * alpha * beta * ud + beta**2 * dd).clamp(min=0).sqrt()
    return evict, merge


def optimal_share(
    logits: torch.Tensor,
    values: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    per_query: bool = False,
) -> torch.Tensor:
    """The share ``μ*`` that minimises the merge error of each isolated pair (keys unchanged).

    With ``e = a_i (O − v_i) / (1 − a_i)`` and ``d = a_j (v_i − v_j) / (1 − a_i)``,
    ``ΔO_merge(μ) = e + μ d`` and the least-squares optimum over the queries is
    ``μ* = −Σ_q e·d / Σ_q ‖d‖²`` (0 where ``d`` vanishes). Unconstrained: a blend needs
    ``0 ≤ μ ≤ 1``; clamp it there (the clamped error is never above eviction's, ``μ = 0``).

    ``logits (..., Q, L)``, ``values (..., L, D)``, ``src, dst (..., E)``. Returns ``(..., E)``, or
    ``(..., Q, E)`` — one optimum per query — with ``per_query``.
    """
    v = values.double()
    a, out = attention_output(logits, v)
    v_i, v_j = _gather_tokens(v, src), _gather_tokens(v, dst)
    ud = out @ (v_i - v_j).transpose(-1, -2) - ((v_i - v_j) * v_i).sum(-1).unsqueeze(-2)  # (O − v_i)·(v_i − v_j)
    dd = ((v_i - v_j) ** 2).sum(-1).unsqueeze(-2)
    a_i, a_j = _gather_weights(a, src), _gather_weights(a, dst)
    c2 = 1.0 / (1.0 - a_i) ** 2
    num = -(c2 * a_i * a_j * ud)
    den = c2 * a_j**2 * dd
    if not per_query:
        num, den = num.sum(-2), den.sum(-2)
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(num))


def shares_from_weights(weights: torch.Tensor, dst: torch.Tensor, length: int) -> torch.Tensor:
    """Blend weights ``w_i`` to shares ``μ_i = w_i / (1 + W_{j(i)})``, ``W_j`` summing over ``j``'s sources.

    ``weights, dst (..., E)``; ``length`` = number of cache positions ``dst`` indexes. Returns ``(..., E)``.
    """
    w = weights.double()
    total = torch.zeros(*w.shape[:-1], length, dtype=w.dtype, device=w.device).scatter_add_(-1, dst, w)
    return w / (1.0 + total.gather(-1, dst))


def cap_shares(shares: torch.Tensor, dst: torch.Tensor, length: int) -> torch.Tensor:
    """Clamp shares to ``[0, 1]`` and scale each survivor's down so that they sum to at most 1.

    ``shares, dst (..., E)``. Returns ``(..., E)``: a valid blend (the survivor keeps ``1 − Σ μ ≥ 0``).
    """
    mu = shares.double().clamp(0.0, 1.0)
    total = torch.zeros(*mu.shape[:-1], length, dtype=mu.dtype, device=mu.device).scatter_add_(-1, dst, mu)
    return mu / total.gather(-1, dst).clamp(min=1.0)


# --------------------------------------------------------------------------------------------
# The library's routing, and blends with arbitrary shares
# --------------------------------------------------------------------------------------------


@dataclass
class Routes:
    """Where each evicted token goes under a merge: all ``(B, H, E)``, sources in ascending position.

    ``src``/``dst``: cache positions of the evicted token and of its nearest survivor (cosine of the
    cached keys, as :func:`mergepress.kernels.nearest_survivor`); ``similarity``: that cosine;
    ``weight``: the library's blend weight ``w`` (0 where the threshold gates the merge).
    """

    src: torch.Tensor
    dst: torch.Tensor
    similarity: torch.Tensor
    weight: torch.Tensor

    def shares(self, length: int) -> torch.Tensor:
        """The library's shares ``w_i / (1 + W_j)`` (``length`` = cache length L), ``(B, H, E)``."""
        return shares_from_weights(self.weight, self.dst, length)


def kept_indices(scores: torch.Tensor, compression_ratio: float) -> torch.Tensor:
    """The positions a ScorerPress keeps: the top ``compute_n_kept(L, ratio)`` scores, ``(B, H, n_kept)``."""
    return scores.topk(compute_n_kept(scores.shape[-1], compression_ratio), dim=-1).indices


def merge_routes(
    keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, config: MergeConfig = DEFAULT_CONFIG
) -> Routes:
    """Routing and blend weights of :func:`mergepress.kernels.merge_uniform` for the kept positions ``kept``.

    ``keys, values (B, H, L, D)``, ``kept (B, H, n_kept)``. The weight is
    ``clamp(s, 0, 1) · ‖v_i‖ / (‖v_i‖ + ‖v_j‖ + 1e-6)`` (the second factor only with value-norm
    weighting), 0 below the similarity threshold. Only the threshold and value-norm weighting are
    modelled: a config with ``merge_fraction < 1``, an error gate or a cap raises ``ValueError``.
    """
    if config.merge_fraction < 1.0 or config.merge_error_gate > 0 or config.max_merge_per_token > 0:
        raise ValueError("merge_routes models the similarity threshold and value-norm weighting only")
    B, H, L, D = keys.shape
    evicted = torch.ones(B, H, L, dtype=torch.bool, device=keys.device).scatter_(2, kept, False)
    src = evicted.nonzero()[:, 2].view(B, H, L - kept.shape[2])
    sim, target = nearest_survivor(_gather_tokens(keys, src), _gather_tokens(keys, kept))
    dst = kept.gather(2, target)
    w = sim.clamp(0.0, 1.0)
    if config.value_norm_weighting:
        src_norm = _gather_tokens(values, src).float().norm(dim=-1)
        dst_norm = _gather_tokens(values, dst).float().norm(dim=-1)
        w = w * src_norm / (src_norm + dst_norm + _EPS)
    w = torch.where(sim >= config.similarity_threshold, w, torch.zeros_like(w))
    return Routes(src=src, dst=dst, similarity=sim, weight=w)


def blend(
    keys: torch.Tensor,
    values: torch.Tensor,
    kept: torch.Tensor,
    routes: Routes,
    shares: torch.Tensor,
    merge_keys: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compressed cache when each source enters its survivor with the given share.

    ``keys, values (B, H, L, D)``, ``kept (B, H, n_kept)``, ``shares (B, H, E)`` (per survivor summing
    to at most 1). Every survivor becomes ``(1 − Σ μ) x_j + Σ μ_i x_i``. With the library's shares
    (:meth:`Routes.shares`) this is :func:`mergepress.kernels.merge_uniform`; other shares (e.g.
    :func:`optimal_share`) give blends the kernel cannot express. Returns ``(B, H, n_kept, D)``
    float64 keys and values.
    """
    D = keys.shape[-1]
    mu = shares.double().unsqueeze(-1)
    dst = routes.dst.unsqueeze(-1).expand(-1, -1, -1, D)

    def mix(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return x.scatter_add(2, dst, mu * (_gather_tokens(x, routes.src) - _gather_tokens(x, routes.dst)))

    new_values = _gather_tokens(mix(values), kept)
    new_keys = _gather_tokens(mix(keys) if merge_keys else keys.double(), kept)
    return new_keys, new_values


# --------------------------------------------------------------------------------------------
# Recording real attention
# --------------------------------------------------------------------------------------------


@dataclass
class LayerRecord:
    """One layer of a prefilled context, as attention sees it.

    Attributes
    ----------
    layer: layer index.
    queries: ``(B, Hq, Q, D)`` post-RoPE queries of the ``Q`` tokens after the context.
    keys, values: ``(B, H, L, D)`` the context's cache (post-RoPE keys) after a no-press prefill.
    scores: ``{name: (B, H, L)}`` each scorer press's scores of the context (higher = kept).
    scale: the attention scale (``head_dim ** -0.5``).
    tail_keys, tail_values: ``(B, H, Q, D)`` cache entries of the tokens after the context.
    attn_output: ``(B, Hq, Q, D)`` the layer's own attention output for those tokens (input of
        ``o_proj``), to check the recording (:func:`recording_error`).
    """

    layer: int
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    scale: float = 1.0
    tail_keys: torch.Tensor | None = None
    tail_values: torch.Tensor | None = None
    attn_output: torch.Tensor | None = None

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.queries.shape[1] // self.keys.shape[1]

    def grouped_queries(self, select: slice | None = None) -> torch.Tensor:
        """Queries grouped by the KV head they attend with: ``(B, H, n_rep · Q', D)``.

        Query head ``h · n_rep + r`` uses KV head ``h`` (as ``repeat_kv``); ``select`` picks a slice of
        the ``Q`` recorded positions (default all). Order along the query axis: head-major.
        """
        q = self.queries if select is None else self.queries[:, :, select]
        B, Hq, Q, D = q.shape
        return q.reshape(B, self.keys.shape[1], self.n_rep * Q, D)

    def logits(self, select: slice | None = None) -> torch.Tensor:
        """``scale · q·k`` of the grouped queries over the context, float64 ``(B, H, n_rep · Q', L)``."""
        return self.scale * self.grouped_queries(select).double() @ self.keys.double().transpose(-1, -2)


class _StopForward(Exception):
    """Raised by the last recording hook: layers after it are not needed."""


def record_layers(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    n_context: int,
    scorers: Mapping[str, ScorerPress] | None = None,
    layers: Sequence[int] | None = None,
) -> list[LayerRecord]:
    """Prefill ``input_ids`` without a press and record what attention sees, layer by layer.

    The first ``n_context`` tokens are the context (the part a press would compress); the rest are
    the tokens that follow it, whose queries probe the cache. Keys and values come from the
    DynamicCache; queries are ``q_proj`` + RoPE (kvpress's ``get_prerope_query_states`` and
    transformers' ``apply_rotary_pos_emb``) with the position embeddings the layer received. Each
    scorer press scores the context alone, exactly as in a prefill of the context (SnapKV's window
    is the context's last tokens). The forward stops after the last requested layer.

    Parameters
    ----------
    model: a causal LM whose decoder layers are ``model.model.layers`` with a ``self_attn``.
    input_ids: ``(B, n_context + Q)``.
    n_context: context length L.
    scorers: ``{name: ScorerPress}`` whose ``score`` to record (their compression ratio is unused).
    layers: layer indices to record (default all).
    """
    scorers = dict(scorers or {})
    decoder = model.model
    wanted = sorted(set(range(len(decoder.layers)) if layers is None else layers))
    records: dict[int, LayerRecord] = {}
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def capture_output(module: nn.Module, args: tuple) -> None:
        # Input of o_proj: the attention output (B, T, Hq·D) of every position.
        captured[module._record_layer] = args[0][:, n_context:].detach()

    def record(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        idx = module.layer_idx
        hidden = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        keys, values = extract_keys_and_values(kwargs["past_key_values"], idx)
        B, H, T, D = keys.shape
        q = get_prerope_query_states(module, hidden[:, n_context:])
        q, _ = apply_rotary_pos_emb(q, q, cos[:, n_context:], sin[:, n_context:])
        ctx_kwargs = dict(kwargs)
        ctx_kwargs["position_embeddings"] = (cos[:, :n_context], sin[:, :n_context])
        if "cache_position" in kwargs and kwargs["cache_position"] is not None:
            ctx_kwargs["cache_position"] = kwargs["cache_position"][:n_context]
        ctx_keys, ctx_values = keys[:, :, :n_context], values[:, :, :n_context]
        scores = {
            name: press.score(module, hidden[:, :n_context], ctx_keys, ctx_values, None, ctx_kwargs).detach()
            for name, press in scorers.items()
        }
        Hq = q.shape[1]
        out = captured.pop(idx).view(B, T - n_context, Hq, D).transpose(1, 2)
        records[idx] = LayerRecord(
            layer=idx,
            queries=q.detach().clone(),
            keys=ctx_keys.detach().clone(),
            values=ctx_values.detach().clone(),
            scores=scores,
            scale=float(module.scaling),
            tail_keys=keys[:, :, n_context:].detach().clone(),
            tail_values=values[:, :, n_context:].detach().clone(),
            attn_output=out.clone(),
        )
        if idx == wanted[-1]:
            raise _StopForward

    try:
        for idx in wanted:
            attn = decoder.layers[idx].self_attn
            attn.o_proj._record_layer = idx
            handles.append(attn.o_proj.register_forward_pre_hook(capture_output))
            handles.append(attn.register_forward_hook(record, with_kwargs=True))
        with torch.no_grad():
            try:
                decoder(input_ids=input_ids, use_cache=True)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        for idx in wanted:
            o_proj = decoder.layers[idx].self_attn.o_proj
            if hasattr(o_proj, "_record_layer"):
                del o_proj._record_layer
    return [records[i] for i in wanted]


def recording_error(record: LayerRecord) -> float:
    """Largest ``|recomputed − actual|`` attention output of the recorded tokens (causal, full cache).

    Recomputes causal softmax attention from the recorded queries, context keys/values and the
    tokens' own keys/values, and compares with what the layer computed. A few 1e-6 in float32.
    """
    keys = torch.cat([record.keys, record.tail_keys], dim=2).double()
    values = torch.cat([record.values, record.tail_values], dim=2).double()
    B, H, T, D = keys.shape
    q = record.queries.double()
    Q = q.shape[2]
    logits = record.scale * q @ keys.repeat_interleave(record.n_rep, dim=1).transpose(-1, -2)
    future = torch.ones(Q, T, dtype=torch.bool).triu(T - Q + 1)
    a = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    out = a @ values.repeat_interleave(record.n_rep, dim=1)
    return float((out - record.attn_output.double()).abs().max())


# --------------------------------------------------------------------------------------------
# Measurement on recorded layers
# --------------------------------------------------------------------------------------------


@dataclass
class PairRatios:
    """Per (query, evicted token) output changes of one layer, each token evicted or merged alone.

    ``similarity``, ``weight``: ``(B, H, E)`` cosine to the nearest survivor and the library weight;
    ``evict_norm``, ``merge_norm``: ``(B, H, Q, E)`` float64 ``‖ΔO_evict‖`` and ``‖ΔO_merge‖`` (keys unchanged);
    ``attention_ratio``: ``(B, H, Q, E)`` ``a_j / a_i``, survivor's over evicted token's attention weight.
    """

    similarity: torch.Tensor
    weight: torch.Tensor
    evict_norm: torch.Tensor
    merge_norm: torch.Tensor
    attention_ratio: torch.Tensor

    @property
    def ratio(self) -> torch.Tensor:
        """``‖ΔO_merge‖ / ‖ΔO_evict‖``, ``(B, H, Q, E)`` (``inf`` where eviction changes nothing)."""
        return self.merge_norm / self.evict_norm

    def holds(self, bound: str = "seed") -> torch.Tensor:
        """Where the bound holds, ``(B, H, Q, E)`` bool.

        ``"seed"``: ``ratio ≤ 1/(1+s)`` with ``s = clamp(similarity, 0, 1)`` (the seed's statement);
        ``"weight"``: ``ratio ≤ 1/(1+w)`` with the weight actually used; ``"evict"``: ``ratio ≤ 1``
        (merging no worse than eviction). Ties count as holding (a tolerance of 1e-9 relative).
        """
        if bound == "seed":
            factor = seed_bound(self.similarity.double().clamp(0.0, 1.0))
        elif bound == "weight":
            factor = seed_bound(self.weight.double())
        elif bound == "evict":
            factor = torch.ones_like(self.weight, dtype=torch.float64)
        else:
            raise ValueError(f"bound must be 'seed', 'weight' or 'evict', got {bound!r}")
        limit = factor.unsqueeze(-2) * self.evict_norm * (1 + 1e-9)
        return self.merge_norm <= limit


def pair_ratios(
    record: LayerRecord,
    kept: torch.Tensor,
    config: MergeConfig = DEFAULT_CONFIG,
    select: slice | None = None,
) -> PairRatios:
    """Per-token ratios on a recorded layer: each evicted token merged alone into its nearest survivor.

    ``kept (B, H, n_kept)`` from :func:`kept_indices`; the weight is the library's for ``config``
    (:func:`merge_routes`), with share ``w / (1 + w)``; ``select`` picks the query positions.
    """
    routes = merge_routes(record.keys, record.values, kept, config)
    w = routes.weight.double()
    logits = record.logits(select)
    evict, merge = pair_norms(logits, record.values, routes.src, routes.dst, w / (1 + w))
    # a_j / a_i = exp(z_j − z_i): no softmax needed, no underflow
    log_ratio = _gather_weights(logits, routes.dst) - _gather_weights(logits, routes.src)
    return PairRatios(routes.similarity, routes.weight, evict, merge, log_ratio.exp())


def relative_output_error(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``‖O' − O‖ / ‖O‖`` per query by direct attention over the full and the compressed cache.

    ``queries (B, H, Q, D)`` grouped per KV head, ``keys, values (B, H, L, D)``,
    ``new_keys, new_values (B, H, L', D)``. Returns ``(B, H, Q)``.
    """
    full = attend(queries, keys, values, scale)
    return (attend(queries, new_keys, new_values, scale) - full).norm(dim=-1) / full.norm(dim=-1)


def split_errors(
    record: LayerRecord,
    kept: torch.Tensor,
    variants: Mapping[str, MergeConfig],
    select: slice | None = None,
    calibration: slice | None = None,
) -> dict[str, float]:
    """Mean relative output error of the whole split (every evicted token at once) on one layer.

    Returns ``{"evict": ..., <variant name>: ..., "optimal (oracle)": ..., "optimal (held-out)": ...}``,
    each averaged over KV heads and the ``select`` queries. Variants run the library kernel
    (:func:`mergepress.kernels.merge_uniform`). The optimal variants route like the library and
    blend with :func:`optimal_share` per pair (clamped, then capped per survivor by
    :func:`cap_shares`), fitted on the evaluation queries themselves (oracle) or on the
    ``calibration`` queries (held-out; skipped when ``calibration`` is None).
    """
    q = record.grouped_queries(select)
    keys, values, scale = record.keys, record.values, record.scale
    D = keys.shape[-1]
    full = attend(q, keys, values, scale)

    def error(new_keys: torch.Tensor, new_values: torch.Tensor) -> float:
        change = attend(q, new_keys, new_values, scale) - full
        return float((change.norm(dim=-1) / full.norm(dim=-1)).mean())

    where = kept.unsqueeze(-1).expand(-1, -1, -1, D)
    out = {"evict": error(keys.gather(2, where), values.gather(2, where))}
    for name, config in variants.items():
        k, v, _ = merge_uniform(keys, values, kept, config)
        out[name] = error(k, v)
    routes = merge_routes(keys, values, kept, MergeConfig(similarity_threshold=-1.0))
    fits = {"optimal (oracle)": select}
    if calibration is not None:
        fits["optimal (held-out)"] = calibration
    L = keys.shape[2]
    for name, fit in fits.items():
        shares = cap_shares(optimal_share(record.logits(fit), values, routes.src, routes.dst), routes.dst, L)
        out[name] = error(*blend(keys, values, kept, routes, shares))
    return out
