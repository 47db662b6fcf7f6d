"""mergepress.bound: every closed form against a direct recomputation of attention on an edited cache.

The direct side never calls the closed forms: it builds the edited cache with explicit loops and
runs plain softmax attention (``reference_attention`` below).
"""

import math

import pytest
import torch
from kvpress import KnormPress, SnapKVPress
from transformers import DynamicCache

from mergepress import MergingPress
from mergepress import bound as bd
from mergepress.kernels import MergeConfig, merge_uniform

TOL = 1e-9  # float64 throughout


def reference_attention(q, k, v, scale):
    """Plain softmax attention, float64: q (Q, D), k/v (L, D) -> (Q, D)."""
    logits = scale * q.double() @ k.double().T
    return torch.softmax(logits, dim=-1) @ v.double()


def edited_cache(k, v, routes, keep_keys=True):
    """Loop reference of a merge: routes = [(src, dst, share)]; returns the surviving (k, v), (L', D)."""
    k, v = k.clone().double(), v.clone().double()
    new_k, new_v = k.clone(), v.clone()
    for i, j, mu in routes:
        new_v[j] += mu * (v[i] - v[j])
        if not keep_keys:
            new_k[j] += mu * (k[i] - k[j])
    gone = {i for i, _, _ in routes}
    keep = [t for t in range(k.shape[0]) if t not in gone]
    return new_k[keep], new_v[keep]


def random_case(seed, L=24, D=8, Q=6):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, D, generator=g, dtype=torch.float64) for n in (Q, L, L))
    return q, k, v, D**-0.5


@pytest.mark.parametrize("seed", range(4))
def test_evict_delta_matches_direct(seed):
    q, k, v, s = random_case(seed)
    src = torch.tensor([3, 7, 11, 20])
    direct = reference_attention(q, *edited_cache(k, v, [(int(i), 0, 0.0) for i in src]), s) - reference_attention(
        q, k, v, s
    )
    closed = bd.evict_delta(s * q @ k.T, v, src)
    assert (direct - closed).abs().max() < TOL


@pytest.mark.parametrize("merge_keys", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_merge_delta_matches_direct(seed, merge_keys):
    q, k, v, s = random_case(seed)
    g = torch.Generator().manual_seed(100 + seed)
    src = torch.tensor([1, 4, 5, 9, 13, 17])
    dst = torch.tensor([0, 0, 2, 2, 2, 21])  # several sources per survivor
    shares = torch.rand(6, generator=g, dtype=torch.float64) / 3  # each survivor's shares sum < 1
    routes = list(zip(src.tolist(), dst.tolist(), shares.tolist()))
    new_k, new_v = edited_cache(k, v, routes, keep_keys=not merge_keys)
    direct = reference_attention(q, new_k, new_v, s) - reference_attention(q, k, v, s)
    closed = bd.merge_delta(s * q @ k.T, v, src, dst, shares, merge_keys=merge_keys)
    assert (direct - closed).abs().max() < TOL


@pytest.mark.parametrize("merge_keys", [False, True])
def test_pair_deltas_match_direct(merge_keys):
    q, k, v, s = random_case(7)
    src, dst = torch.tensor([2, 5, 8]), torch.tensor([0, 0, 10])  # dst may repeat: pairs are independent
    shares = torch.tensor([0.1, 0.45, 0.3], dtype=torch.float64)
    d_evict, d_merge = bd.pair_deltas(s * q @ k.T, v, src, dst, shares, merge_keys=merge_keys)
    full = reference_attention(q, k, v, s)
    for e in range(3):
        route = [(int(src[e]), int(dst[e]), float(shares[e]))]
        evicted = reference_attention(q, *edited_cache(k, v, [(int(src[e]), 0, 0.0)]), s) - full
        merged = reference_attention(q, *edited_cache(k, v, route, keep_keys=not merge_keys), s) - full
        assert (d_evict[:, e] - evicted).abs().max() < TOL
        assert (d_merge[:, e] - merged).abs().max() < TOL


def test_pair_norms_match_pair_deltas():
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(2, 3, 5, 30, generator=g, dtype=torch.float64)  # peaked softmax
    values = torch.randn(2, 3, 30, 8, generator=g, dtype=torch.float64)
    src = torch.randint(10, 30, (2, 3, 12), generator=g)
    dst = torch.randint(0, 10, (2, 3, 12), generator=g)
    shares = torch.rand(2, 3, 12, generator=g, dtype=torch.float64) / 2
    d_evict, d_merge = bd.pair_deltas(logits, values, src, dst, shares)
    n_evict, n_merge = bd.pair_norms(logits, values, src, dst, shares)
    torch.testing.assert_close(n_evict, d_evict.norm(dim=-1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(n_merge, d_merge.norm(dim=-1), rtol=1e-9, atol=1e-12)


def ideal_cache(seed, n_sources=1, attention_ratio=1.0, L=12, D=6):
    """Keys and values where the ideal assumptions hold for every query: the survivor (position 0) and the
    sources (1..m) share one key direction, so their attention ratio a_j/a_i is the same for all queries
    when the key norm ratio is matched; position L-1 balances the output so that O = v_0 for query 0."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, D, generator=g, dtype=torch.float64)
    k = torch.randn(L, D, generator=g, dtype=torch.float64)
    v = torch.randn(L, D, generator=g, dtype=torch.float64)
    # same direction as the survivor; logit offset log(r) makes a_j / a_i = r for this query
    unit = q[0] / q[0].norm()
    k[0] = 10.0 * unit
    for i in range(1, n_sources + 1):
        k[i] = k[0] - math.log(attention_ratio) / (D**-0.5 * q[0].norm()) * unit
    a = torch.softmax(D**-0.5 * q @ k.T, dim=-1)[0]
    rest = (a[:-1, None] * v[:-1]).sum(0)
    v[-1] = (v[0] - rest) / a[-1]  # now O = Σ a_k v_k = v_0
    return q, k, v, D**-0.5


@pytest.mark.parametrize("w", [0.2, 0.7, 1.0])
def test_seed_bound_is_exact_under_its_assumptions(w):
    q, k, v, s = ideal_cache(0)
    full = reference_attention(q, k, v, s)
    assert (full[0] - v[0]).abs().max() < 1e-12  # the construction: O = v_j
    evict = reference_attention(q, *edited_cache(k, v, [(1, 0, 0.0)]), s) - full
    merge = reference_attention(q, *edited_cache(k, v, [(1, 0, w / (1 + w))]), s) - full
    # vector identity, not just a norm bound
    assert (merge - evict / (1 + w)).abs().max() < TOL
    assert abs(float(merge.norm() / evict.norm()) - bd.seed_bound(w)) < TOL


@pytest.mark.parametrize("r", [0.3, 1.0, 2.5, 10.0])
@pytest.mark.parametrize("w", [0.25, 1.0])
def test_ideal_ratio_with_unequal_attention(r, w):
    q, k, v, s = ideal_cache(1, attention_ratio=r)
    a = torch.softmax(s * q @ k.T, dim=-1)[0]
    assert abs(float(a[0] / a[1]) - r) < 1e-9
    full = reference_attention(q, k, v, s)
    evict = reference_attention(q, *edited_cache(k, v, [(1, 0, 0.0)]), s) - full
    merge = reference_attention(q, *edited_cache(k, v, [(1, 0, w / (1 + w))]), s) - full
    ratio = float(merge.norm() / evict.norm())
    assert abs(ratio - bd.ideal_ratio(w, r)) < 1e-9
    # the seed's bound holds exactly on 1 <= r <= 1 + 2/w
    assert (ratio <= bd.seed_bound(w) + 1e-12) == (1 - 1e-12 <= r <= 1 + 2 / w + 1e-12)


@pytest.mark.parametrize("m", [1, 2, 5])
def test_dilution_with_several_sources(m):
    w = 0.8
    q, k, v, s = ideal_cache(2, n_sources=m)
    full = reference_attention(q, k, v, s)
    sources = list(range(1, m + 1))
    evict = reference_attention(q, *edited_cache(k, v, [(i, 0, 0.0) for i in sources]), s) - full
    share = w / (1 + m * w)  # the library's blend: (v_j + Σ w v_i) / (1 + m w)
    merge = reference_attention(q, *edited_cache(k, v, [(i, 0, share) for i in sources]), s) - full
    assert (merge - bd.dilution_factor(w, m) * evict).abs().max() < TOL
    assert (bd.dilution_factor(w, m) > bd.seed_bound(w)) == (m > 1)


def test_counterexamples_merge_no_better_or_worse():
    q, k, v, s = random_case(11)
    full = reference_attention(q, k, v, s)
    # identical values: the blend changes nothing, merge == evict whatever the similarity
    v_same = v.clone()
    v_same[3] = v_same[0]
    evict = reference_attention(q, *edited_cache(k, v_same, [(3, 0, 0.0)]), s) - reference_attention(q, k, v_same, s)
    merge = reference_attention(q, *edited_cache(k, v_same, [(3, 0, 0.5)]), s) - reference_attention(q, k, v_same, s)
    assert (merge - evict).abs().max() < TOL
    # dominant survivor (a_j = 10 a_i) with v_j = O: merging at w = 1 is 4x worse than eviction
    q, k, v, s = ideal_cache(3, attention_ratio=10.0)
    full = reference_attention(q, k, v, s)
    evict = reference_attention(q, *edited_cache(k, v, [(1, 0, 0.0)]), s) - full
    merge = reference_attention(q, *edited_cache(k, v, [(1, 0, 0.5)]), s) - full
    assert abs(float(merge.norm() / evict.norm()) - 4.0) < 1e-9


def test_optimal_share_minimises_the_error():
    q, k, v, s = random_case(5, L=20, D=6, Q=7)
    logits = (s * q @ k.T).view(1, 1, 7, 20)
    values = v.view(1, 1, 20, 6)
    src, dst = torch.tensor([[[4, 9, 15]]]), torch.tensor([[[0, 1, 1]]])
    best = bd.optimal_share(logits, values, src, dst)
    full = reference_attention(q, k, v, s)
    for e in range(3):
        i, j = int(src[0, 0, e]), int(dst[0, 0, e])

        def sq_error(mu, i=i, j=j):  # Σ_q ‖ΔO_merge(μ)‖², by direct attention; exactly quadratic in μ
            return float(((reference_attention(q, *edited_cache(k, v, [(i, j, mu)]), s) - full) ** 2).sum())

        f_minus, f_zero, f_plus = sq_error(-1.0), sq_error(0.0), sq_error(1.0)
        vertex = -(f_plus - f_minus) / (2 * (f_plus + f_minus - 2 * f_zero))
        assert abs(float(best[0, 0, e]) - vertex) < 1e-8
        mu = float(best[0, 0, e])
        assert sq_error(mu) <= min(sq_error(mu - 1e-3), sq_error(mu + 1e-3), f_zero)
    # per query: the optimum leaves |sin| of the angle between e = ΔO_evict and d = dΔO/dμ, never above eviction
    per_query = bd.optimal_share(logits, values, src, dst, per_query=True)  # (1, 1, Q, E)
    zero = torch.zeros(1, 1, 3, dtype=torch.float64)
    for t in range(7):
        e_vec, _ = bd.pair_deltas(logits[..., t : t + 1, :], values, src, dst, zero)
        _, d_one = bd.pair_deltas(logits[..., t : t + 1, :], values, src, dst, zero + 1)
        _, at_opt = bd.pair_deltas(logits[..., t : t + 1, :], values, src, dst, per_query[..., t, :])
        e_vec, d_vec = e_vec[0, 0, 0], d_one[0, 0, 0] - e_vec[0, 0, 0]  # (E, D)
        cos = (e_vec * d_vec).sum(-1) / (e_vec.norm(dim=-1) * d_vec.norm(dim=-1))
        sin = (1 - cos**2).clamp(min=0).sqrt()
        torch.testing.assert_close(at_opt[0, 0, 0].norm(dim=-1), sin * e_vec.norm(dim=-1), rtol=1e-7, atol=1e-12)


def test_cap_shares_makes_valid_blends():
    shares = torch.tensor([0.7, 0.6, -0.2, 1.5, 0.1], dtype=torch.float64)
    dst = torch.tensor([0, 0, 0, 1, 2])
    capped = bd.cap_shares(shares, dst, 3)
    totals = torch.zeros(3, dtype=torch.float64).scatter_add_(0, dst, capped)
    assert (capped >= 0).all() and (totals <= 1 + 1e-12).all()
    torch.testing.assert_close(capped, torch.tensor([0.7 / 1.3, 0.6 / 1.3, 0.0, 1.0, 0.1], dtype=torch.float64))


@pytest.mark.parametrize(
    "config",
    [MergeConfig(), MergeConfig(value_norm_weighting=False), MergeConfig(merge_keys=True, similarity_threshold=0.2)],
)
def test_routes_and_blend_reproduce_the_kernel(config):
    g = torch.Generator().manual_seed(9)
    keys, values = torch.randn(2, 3, 40, 16, generator=g), torch.randn(2, 3, 40, 16, generator=g)
    kept = torch.randn(2, 3, 40, generator=g).topk(15, -1).indices
    routes = bd.merge_routes(keys, values, kept, config)
    new_k, new_v = bd.blend(keys, values, kept, routes, routes.shares(40), merge_keys=config.merge_keys)
    ref_k, ref_v, stats = merge_uniform(keys, values, kept, config, with_stats=True)
    torch.testing.assert_close(new_v.float(), ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_k.float(), ref_k, rtol=1e-5, atol=1e-5)
    assert int((routes.weight > 0).sum()) == int(stats.merged.sum())


def test_merge_routes_rejects_unmodelled_gates():
    keys = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError):
        bd.merge_routes(keys, keys, torch.arange(4).view(1, 1, 4), MergeConfig(max_merge_per_token=1))


def context_ids(model, n, seed=0):
    return torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def test_record_layers_sees_what_attention_sees(tiny_llama):
    L, Q = 48, 12
    ids = context_ids(tiny_llama, L + Q)
    snap = SnapKVPress(0.5, window_size=8)
    records = bd.record_layers(tiny_llama, ids, L, {"knorm": KnormPress(), "snapkv": snap})
    assert [r.layer for r in records] == [0, 1]
    # keys/values equal a prefill of the context alone (causality), scores equal the presses' own
    cache = DynamicCache()
    seen = []
    original = snap.score

    def spy(*args):
        seen.append(original(*args))
        return seen[-1]

    snap.score = spy
    with torch.no_grad(), snap(tiny_llama):
        tiny_llama.model(input_ids=ids[:, :L], past_key_values=DynamicCache())
    with torch.no_grad():
        tiny_llama.model(input_ids=ids[:, :L], past_key_values=cache)
    for rec, layer, snap_scores in zip(records, cache.layers, seen):
        assert rec.queries.shape == (1, 4, Q, 16) and rec.keys.shape == (1, 2, L, 16)
        torch.testing.assert_close(rec.keys, layer.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec.values, layer.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec.scores["knorm"], KnormPress().score(None, None, layer.keys, None, None, {}))
        torch.testing.assert_close(rec.scores["snapkv"], snap_scores, rtol=1e-5, atol=1e-6)
        assert bd.recording_error(rec) < 1e-5  # queries and scale reproduce the layer's attention output
    # stopping early: only the requested layer is recorded
    assert [r.layer for r in bd.record_layers(tiny_llama, ids, L, layers=[0])] == [0]


def test_measurements_match_the_press(tiny_llama):
    L, Q = 48, 12
    ids = context_ids(tiny_llama, L + Q, seed=1)
    records = bd.record_layers(tiny_llama, ids, L, {"knorm": KnormPress()})
    # the cache a real MergingPress prefill leaves behind
    cache = DynamicCache()
    with torch.no_grad(), MergingPress(KnormPress(0.5))(tiny_llama):
        tiny_llama.model(input_ids=ids[:, :L], past_key_values=cache)
    for rec, layer in zip(records, cache.layers):
        kept = bd.kept_indices(rec.scores["knorm"], 0.5)
        errors = bd.split_errors(rec, kept, {"merge": MergeConfig()}, calibration=slice(0, 6), select=slice(6, None))
        q = rec.grouped_queries(slice(6, None))
        direct = bd.relative_output_error(q, rec.keys, rec.values, layer.keys, layer.values, rec.scale)
        assert abs(errors["merge"] - float(direct.mean())) < 1e-5
        assert set(errors) == {"evict", "merge", "optimal (oracle)", "optimal (held-out)"}
        # per-pair ratios: one pair recomputed by hand
        pairs = bd.pair_ratios(rec, kept)
        routes = bd.merge_routes(rec.keys, rec.values, kept)
        h, e = 1, 3
        i, j, w = int(routes.src[0, h, e]), int(routes.dst[0, h, e]), float(routes.weight[0, h, e])
        qh = rec.grouped_queries()[0, h]
        k, v = rec.keys[0, h], rec.values[0, h]
        full = reference_attention(qh, k, v, rec.scale)
        evict = reference_attention(qh, *edited_cache(k, v, [(i, 0, 0.0)]), rec.scale) - full
        merge = reference_attention(qh, *edited_cache(k, v, [(i, j, w / (1 + w))]), rec.scale) - full
        torch.testing.assert_close(pairs.evict_norm[0, h, :, e], evict.norm(dim=-1), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(pairs.merge_norm[0, h, :, e], merge.norm(dim=-1), rtol=1e-6, atol=1e-9)
        a = torch.softmax(rec.logits()[0, h], dim=-1)
        torch.testing.assert_close(pairs.attention_ratio[0, h, :, e], a[:, j] / a[:, i])
        holds = pairs.holds("seed")[0, h, :, e]
        s = min(max(float(routes.similarity[0, h, e]), 0.0), 1.0)
        assert holds.tolist() == (merge.norm(dim=-1) <= evict.norm(dim=-1) / (1 + s) * (1 + 1e-9)).tolist()
