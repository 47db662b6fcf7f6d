"""Both kernels against a slow, obviously-correct loop over (batch, head, token).

The kernels run on ``MERGEPRESS_TEST_DEVICE`` (default ``cpu``; e.g. ``cuda`` on a GPU machine,
see ``benchmarks/gpu_check.sh``); the references always run on the CPU.
"""

import itertools
import math
import os

import pytest
import torch

from mergepress import kernels
from mergepress.kernels import MergeConfig, merge_adaptive, merge_into, merge_uniform, nearest_survivor

EPS = 1e-6
DEVICE = torch.device(os.environ.get("MERGEPRESS_TEST_DEVICE", "cpu"))


def on_device(*tensors):
    return tuple(t.to(DEVICE) for t in tensors)


def on_cpu(*tensors):
    return tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in tensors)


def reference_head(keys, values, sources, survivors, cfg):
    """Merge one head the slow way. keys/values (L, D); sources/survivors: lists of positions,
    survivors in destination order. Returns {survivor position: (key, value)} in float64."""
    k32, v64 = keys.float(), values.double()

    def unit(x):
        return x / max(float(x.norm()), EPS)

    routes = []  # (source, target, similarity)
    for i in sources:
        best, best_sim = None, -math.inf
        for j in survivors:  # strict '>' keeps the first survivor on ties
            s = float(unit(k32[i]) @ unit(k32[j]))
            if s > best_sim:
                best, best_sim = j, s
        if best is not None:
            routes.append((i, best, best_sim))

    cands = [r for r in routes if r[2] >= cfg.similarity_threshold]
    if cfg.merge_fraction < 1.0 and cands:
        q = torch.quantile(torch.tensor([r[2] for r in cands], dtype=torch.float32), 1.0 - cfg.merge_fraction)
        cands = [r for r in cands if r[2] >= float(q)]
    if cfg.merge_error_gate > 0:
        cands = [
            r
            for r in cands
            if float(v64[r[0]].norm()) * (1 - min(max(r[2], 0), 1)) / (1 + min(max(r[2], 0), 1)) <= cfg.merge_error_gate
        ]
    if cfg.max_merge_per_token > 0:
        kept = []
        for j in survivors:
            incoming = sorted((r for r in cands if r[1] == j), key=lambda r: (-r[2], r[0]))
            kept += incoming[: cfg.max_merge_per_token]
        cands = kept

    out = {}
    for j in survivors:
        num_k, num_v, den = k32[j].double().clone(), v64[j].clone(), 1.0
        for i, t, s in cands:
            if t != j:
                continue
            w = min(max(s, 0.0), 1.0)
            if cfg.value_norm_weighting:
                ni, nj = float(v64[i].norm()), float(v64[j].norm())
                w *= ni / (ni + nj + EPS)
            num_k += w * k32[i].double()
            num_v += w * v64[i]
            den += w
        out[j] = ((num_k / den) if cfg.merge_keys else keys[j].double(), num_v / den)
    return out


CONFIGS = [
    MergeConfig(),
    MergeConfig(similarity_threshold=0.3),
    MergeConfig(similarity_threshold=-1.0, value_norm_weighting=False),
    MergeConfig(merge_fraction=0.5),
    MergeConfig(similarity_threshold=0.1, merge_fraction=0.75, max_merge_per_token=2),
    MergeConfig(max_merge_per_token=1, merge_keys=True),
    MergeConfig(merge_error_gate=1.5),
    MergeConfig(merge_error_gate=2.0, max_merge_per_token=3, merge_fraction=0.9, merge_keys=True),
]


def random_cache(B, H, L, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # A shared direction makes similarities spread over (-1, 1), so every gate has work to do.
    base = torch.randn(B, H, 1, D, generator=g)
    keys = (0.7 * base + torch.randn(B, H, L, D, generator=g)).to(dtype)
    values = torch.randn(B, H, L, D, generator=g).to(dtype)
    return keys, values


@pytest.mark.parametrize("cfg_id", range(len(CONFIGS)))
@pytest.mark.parametrize("seed", [0, 1])
def test_uniform_matches_loop(cfg_id, seed):
    cfg = CONFIGS[cfg_id]
    B, H, L, D = 2, 3, 23, 8
    keys, values = random_cache(B, H, L, D, seed)
    n_kept = [1, 7, 12][seed % 3 + (cfg_id % 2)]
    kept = torch.rand(B, H, L, generator=torch.Generator().manual_seed(seed)).topk(n_kept, -1).indices
    mk, mv, _ = on_cpu(*merge_uniform(*on_device(keys, values, kept), cfg))
    for b, h in itertools.product(range(B), range(H)):
        survivors = kept[b, h].tolist()
        sources = sorted(set(range(L)) - set(survivors))
        ref = reference_head(keys[b, h], values[b, h], sources, survivors, cfg)
        for slot, j in enumerate(survivors):
            torch.testing.assert_close(mv[b, h, slot].double(), ref[j][1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mk[b, h, slot].double(), ref[j][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg_id", range(len(CONFIGS)))
def test_adaptive_matches_loop(cfg_id):
    cfg = CONFIGS[cfg_id]
    B, H, L, D = 2, 4, 19, 8
    keys, values = random_cache(B, H, L, D, 10 + cfg_id)
    g = torch.Generator().manual_seed(cfg_id)
    # Different eviction counts per head, including a head with none and one with all but one.
    evicted = torch.rand(B, H, L, generator=g) < torch.tensor([0.0, 0.3, 0.7, 1.0]).view(1, H, 1)
    evicted[:, 3, 5] = False
    ak, av, _ = on_cpu(*merge_adaptive(*on_device(keys, values, evicted), cfg))
    assert torch.equal(av[evicted], values[evicted]), "evicted positions must stay unchanged"
    assert torch.equal(ak[evicted], keys[evicted])
    for b, h in itertools.product(range(B), range(H)):
        sources = evicted[b, h].nonzero().flatten().tolist()
        survivors = (~evicted[b, h]).nonzero().flatten().tolist()
        ref = reference_head(keys[b, h], values[b, h], sources, survivors, cfg)
        for j in survivors:
            torch.testing.assert_close(av[b, h, j].double(), ref[j][1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ak[b, h, j].double(), ref[j][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_bytes", [64, 2**30])
def test_merge_into_with_scattered_masks_matches_loop(block_bytes):
    """Validity masks that are not a prefix per head (the kernels only pass prefixes)."""
    cfg = MergeConfig(max_merge_per_token=2, merge_keys=True, merge_fraction=0.8)
    B, H, E, K, D = 1, 3, 17, 11, 8
    keys, values = random_cache(B, H, E + K, D, 30)
    g = torch.Generator().manual_seed(30)
    src_valid, dst_valid = torch.rand(B, H, E, generator=g) > 0.3, torch.rand(B, H, K, generator=g) > 0.4
    dst_valid[0, 2] = False  # a head with no survivor
    mk, mv, _ = on_cpu(
        *merge_into(
            *on_device(keys[:, :, :E], values[:, :, :E], keys[:, :, E:], values[:, :, E:]),
            cfg,
            *on_device(src_valid, dst_valid),
            block_bytes=block_bytes,
        )
    )
    for h in range(H):
        sources = src_valid[0, h].nonzero().flatten().tolist()
        survivors = (E + dst_valid[0, h].nonzero().flatten()).tolist()
        ref = reference_head(keys[0, h], values[0, h], sources, survivors, cfg)
        for j in range(K):
            want = ref[E + j] if E + j in ref else (keys[0, h, E + j].double(), values[0, h, E + j].double())
            torch.testing.assert_close(mv[0, h, j].double(), want[1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mk[0, h, j].double(), want[0], atol=1e-5, rtol=1e-5)


def test_adaptive_with_separate_survivors_matches_loop():
    """DMS passes old masked tokens as neither sources nor survivors."""
    cfg = MergeConfig(max_merge_per_token=2)
    keys, values = random_cache(1, 2, 30, 8, 3)
    g = torch.Generator().manual_seed(3)
    r = torch.rand(1, 2, 30, generator=g)
    evicted, gone = r < 0.3, (r >= 0.3) & (r < 0.5)
    ak, av, _ = merge_adaptive(keys, values, evicted, cfg, survivors=~(evicted | gone))
    assert torch.equal(av[evicted | gone], values[evicted | gone])
    for h in range(2):
        sources = evicted[0, h].nonzero().flatten().tolist()
        survivors = (~(evicted | gone))[0, h].nonzero().flatten().tolist()
        ref = reference_head(keys[0, h], values[0, h], sources, survivors, cfg)
        for j in survivors:
            torch.testing.assert_close(av[0, h, j].double(), ref[j][1], atol=1e-5, rtol=1e-5)


def test_adaptive_equals_uniform_on_the_same_split():
    keys, values = random_cache(2, 3, 40, 16, 5)
    kept = torch.randn(2, 3, 40).topk(15, -1).indices
    evicted = torch.ones(2, 3, 40, dtype=torch.bool).scatter_(2, kept, False)
    cfg = MergeConfig(max_merge_per_token=2, merge_keys=True)
    uk, uv, _ = merge_uniform(keys, values, kept, cfg)
    ak, av, _ = merge_adaptive(keys, values, evicted, cfg)
    idx = kept.unsqueeze(-1).expand(-1, -1, -1, 16)
    torch.testing.assert_close(av.gather(2, idx), uv)
    torch.testing.assert_close(ak.gather(2, idx), uk)


def test_ties_go_to_the_first_survivor_and_the_earliest_source():
    D = 4
    keys = torch.zeros(1, 1, 6, D)
    keys[0, 0, :, 0] = 1.0  # all keys identical: every similarity is 1
    values = torch.arange(6 * D, dtype=torch.float32).view(1, 1, 6, D)
    kept = torch.tensor([[[4, 1, 2]]])  # destination order 4, 1, 2
    sim, idx = nearest_survivor(keys[:, :, [0, 3, 5]], keys[:, :, [4, 1, 2]])
    assert idx.tolist() == [[[0, 0, 0]]]
    _, mv, stats = merge_uniform(keys, values, kept, MergeConfig(max_merge_per_token=1), with_stats=True)
    # Survivor 4 absorbs only source 0 (earliest of the tied sources); 3 and 5 are capped.
    w = 0.5 * values[0, 0, 0].norm() / (values[0, 0, 0].norm() + values[0, 0, 4].norm() + EPS)
    torch.testing.assert_close(mv[0, 0, 0], (values[0, 0, 4] + w * values[0, 0, 0] * 2) / (1 + 2 * w))
    assert stats.gated_cap.item() == 2 and stats.merged.item() == 1


BLOCKS = [4, 64, 1000, 4 * 64 * 128, 2**30]  # 1 x 1 tiles ... tiles over survivors ... one block


@pytest.mark.parametrize("block_bytes", BLOCKS)
@pytest.mark.parametrize("mask", ["none", "prefix", "scattered", "all_invalid"])
def test_blocked_search_equals_unblocked(block_bytes, mask):
    keys, _ = random_cache(2, 3, 50, 8, 7)
    src, dst = keys[:, :, :20], keys[:, :, 20:].clone()
    dst[:, :, 5] = dst[:, :, 2]  # exact ties
    valid = {
        "none": None,
        "prefix": torch.arange(30) < torch.tensor([[0, 7, 30], [1, 29, 12]]).unsqueeze(-1),
        "scattered": torch.rand(2, 3, 30, generator=torch.Generator().manual_seed(7)) > 0.2,
        "all_invalid": torch.zeros(2, 3, 30, dtype=torch.bool),  # every gate closed: no survivor anywhere
    }[mask]
    s0, i0 = nearest_survivor(src, dst, valid, block_bytes=2**40)
    s1, i1 = on_cpu(*nearest_survivor(*on_device(src, dst), None if valid is None else valid.to(DEVICE), block_bytes))
    # Same survivors; similarities equal up to the BLAS kernel's rounding for that block shape.
    assert torch.equal(i0, i1)
    torch.testing.assert_close(s0, s1, rtol=0, atol=1e-6)
    if valid is not None:
        has_survivor = valid.any(-1, keepdim=True).expand_as(i1)
        assert bool(valid.gather(2, i1)[has_survivor].all()), "an invalid survivor was chosen"
        assert bool((s1[~has_survivor] == float("-inf")).all()) and bool((i1[~has_survivor] == 0).all())


def exact_unit_keys(B, H, N, D, seed):
    """Keys with four entries of ±1 (norm exactly 2): every cosine is an exact multiple of 1/4 in any
    summation order, so exact ties are everywhere and no block shape can round them apart."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.zeros(B, H, N, D)
    pos = torch.rand(B, H, N, D, generator=g).argsort(-1)[..., :4]
    keys.scatter_(-1, pos, torch.randint(0, 2, (B, H, N, 4), generator=g).float() * 2 - 1)
    return keys


@pytest.mark.parametrize("block_bytes", [*BLOCKS, 4 * 40 * 128, 4 * 40 * 256])  # the last: chunked argmax
def test_blocked_search_breaks_exact_ties_like_torch_max(block_bytes):
    keys = exact_unit_keys(1, 2, 296, 8, 17)
    src, dst = keys[:, :, :40], keys[:, :, 40:]
    s, i = on_cpu(*nearest_survivor(*on_device(src, dst), block_bytes=block_bytes))
    sim = (src / 2) @ (dst / 2).transpose(-1, -2)  # exact
    ref = sim.max(-1)  # first maximal index
    assert bool((sim == ref.values.unsqueeze(-1)).sum(-1).gt(1).any()), "the test needs ties"
    assert torch.equal(i, ref.indices) and torch.equal(s, ref.values)


@pytest.mark.parametrize("shape", [(8, 256), (64, 512), (33, 1000), (9, 4096), (8, 300)])
def test_row_max_equals_torch_max(shape):
    """The chunked CPU argmax: ties within a chunk, across chunks, in the tail columns past the
    last whole chunk, whole rows of -inf or equal, NaN."""
    g = torch.Generator().manual_seed(shape[1])
    block = torch.randn(shape, generator=g)
    r, c = shape
    s = kernels._ARGMAX_CHUNKS  # column j is in strided chunk j % s
    block[0, 3] = block[0, 3 + s] = 9.0  # a tie within one chunk
    block[1, c - 1] = block[1, 0] = 9.0  # a tie across chunks, the later chunk holding the earlier column
    block[2] = float("-inf")
    block[3] = 0.5
    block[4, 10] = block[4, 11] = 9.0  # neighbours: different chunks
    block[5, c - 1] = block[5, 1] = 9.0  # the last column: a tail column when c % s != 0
    block[6, c - 1] = 9.0
    block[7, [5, c - 1]] = float("nan")
    m, i = kernels._row_max(block.to(DEVICE))
    ref = block.max(-1)
    assert torch.equal(i.cpu(), ref.indices) and torch.allclose(m.cpu(), ref.values, rtol=0, atol=0, equal_nan=True)
    exact = torch.randint(-3, 4, shape, generator=g).float()  # ties everywhere
    assert torch.equal(kernels._row_max(exact)[1], exact.max(-1).indices)


TILED_CONFIGS = [
    MergeConfig(),
    MergeConfig(
        similarity_threshold=0.2, merge_fraction=0.7, merge_error_gate=2.0, max_merge_per_token=2, merge_keys=True
    ),
    MergeConfig(similarity_threshold=1.0),  # every gate closed
]


def assert_same_merge(a, b):
    """Two kernel outputs ``(keys, values, stats)`` from the same routing (up to last-bit rounding)."""
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-6)
    for name, x in vars(a[2]).items():
        torch.testing.assert_close(x, getattr(b[2], name), rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("block_bytes", [1000, 4 * 64 * 256, 4 * 200 * 512])
@pytest.mark.parametrize("cfg_id", range(len(TILED_CONFIGS)))
def test_kernels_with_small_blocks_equal_one_block(block_bytes, cfg_id):
    """Tiles over sources and survivors (250 x 1, 64 x 256, 200 x 512) give the one-block result."""
    cfg = TILED_CONFIGS[cfg_id]
    B, H, L, D = 1, 3, 700, 16
    keys, values = random_cache(B, H, L, D, 20 + cfg_id)
    kept = torch.rand(B, H, L, generator=torch.Generator().manual_seed(cfg_id)).topk(512, -1).indices
    ref = merge_uniform(keys, values, kept, cfg, with_stats=True, block_bytes=2**40)
    out = on_cpu(*merge_uniform(*on_device(keys, values, kept), cfg, with_stats=True, block_bytes=block_bytes))
    out = (*out[:2], type(out[2])(**{k: v.cpu() for k, v in vars(out[2]).items()}))
    assert_same_merge(out, ref)

    # Adaptive: unequal budgets per head, one head with nothing to evict, one with a single survivor.
    evicted = torch.rand(B, H, L, generator=torch.Generator().manual_seed(9)) < torch.tensor([0.0, 0.4, 0.9]).view(
        1, H, 1
    )
    evicted[0, 2] = True
    evicted[0, 2, 123] = False
    ref = merge_adaptive(keys, values, evicted, cfg, with_stats=True, block_bytes=2**40)
    out = on_cpu(*merge_adaptive(*on_device(keys, values, evicted), cfg, with_stats=True, block_bytes=block_bytes))
    out = (*out[:2], type(out[2])(**{k: v.cpu() for k, v in vars(out[2]).items()}))
    assert_same_merge(out, ref)
    if cfg.similarity_threshold == 1.0:
        assert torch.equal(out[1], values) and out[2].merged.sum() == 0


def test_all_gates_closed_is_hard_eviction():
    keys, values = random_cache(1, 2, 30, 8, 8)
    kept = torch.randn(1, 2, 30).topk(10, -1).indices
    mk, mv, stats = merge_uniform(keys, values, kept, MergeConfig(similarity_threshold=1.0), with_stats=True)
    idx = kept.unsqueeze(-1).expand(-1, -1, -1, 8)
    assert torch.equal(mv, values.gather(2, idx)) and torch.equal(mk, keys.gather(2, idx))
    assert stats.merged.sum() == 0 and stats.gated_threshold.sum() == 40


def test_stats_add_up():
    keys, values = random_cache(2, 2, 40, 8, 9)
    kept = torch.randn(2, 2, 40).topk(12, -1).indices
    cfg = MergeConfig(similarity_threshold=0.4, merge_fraction=0.8, merge_error_gate=0.3, max_merge_per_token=2)
    _, _, s = merge_uniform(keys, values, kept, cfg, with_stats=True)
    total = s.merged + s.gated_threshold + s.gated_fraction + s.gated_error + s.gated_cap + s.zero_weight
    assert torch.equal(total, s.evicted) and bool((s.evicted == 28).all())
    assert bool((s.max_absorbed <= 2).all())
    for name in ("gated_threshold", "gated_fraction", "gated_error", "gated_cap"):
        assert getattr(s, name).sum() > 0, f"{name} never fired: the test inputs are too easy"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_and_close_to_fp32(dtype):
    keys, values = random_cache(1, 2, 64, 16, 11)
    keys, values = keys * 300, values * 300  # large magnitudes: squared norms overflow fp16
    kept = torch.randn(1, 2, 64).topk(16, -1).indices
    cfg = MergeConfig(merge_keys=True)
    hk, hv, _ = on_cpu(*merge_uniform(*on_device(keys.to(dtype), values.to(dtype), kept), cfg))
    fk, fv, _ = merge_uniform(keys.to(dtype).float(), values.to(dtype).float(), kept, cfg)
    assert hv.dtype == dtype and torch.isfinite(hv).all() and torch.isfinite(hk).all()
    torch.testing.assert_close(hv.float(), fv, rtol=2e-2, atol=2.0)


def test_float64_cache_keeps_its_dtype_and_matches_fp32():
    # The blend accumulates in float32; a float64 cache used to fail in index_add_.
    keys, values = random_cache(1, 2, 40, 8, 21)
    kept = torch.randn(1, 2, 40).topk(10, -1).indices
    mask = torch.rand(1, 2, 40) > 0.5
    cfg = MergeConfig(merge_keys=True, similarity_threshold=-1.0)
    dk, dv, _ = merge_uniform(keys.double(), values.double(), kept, cfg)
    fk, fv, _ = merge_uniform(keys, values, kept, cfg)
    assert dv.dtype == torch.float64 and dk.dtype == torch.float64
    torch.testing.assert_close(dv.float(), fv, rtol=1e-5, atol=1e-5)
    _, av, _ = merge_adaptive(keys.double(), values.double(), mask, cfg)
    _, bv, _ = merge_adaptive(keys, values, mask, cfg)
    assert av.dtype == torch.float64
    torch.testing.assert_close(av.float(), bv, rtol=1e-5, atol=1e-5)


def test_zero_norm_keys_and_values_give_no_nan():
    keys, values = random_cache(1, 1, 12, 4, 12)
    keys[0, 0, ::2] = 0
    values[0, 0, 1::3] = 0
    kept = torch.arange(0, 12, 3).view(1, 1, -1)
    for cfg in (MergeConfig(), MergeConfig(merge_keys=True, value_norm_weighting=False, merge_error_gate=1.0)):
        mk, mv, _ = merge_uniform(keys, values, kept, cfg)
        assert torch.isfinite(mv).all() and torch.isfinite(mk).all()
    keys.zero_()
    values.zero_()
    _, av, _ = merge_adaptive(keys, values, torch.rand(1, 1, 12) > 0.5, MergeConfig())
    assert torch.isfinite(av).all()


def test_edge_sizes():
    keys, values = random_cache(1, 2, 10, 4, 13)
    all_kept = torch.arange(10).expand(1, 2, 10)
    mk, mv, _ = merge_uniform(keys, values, all_kept, MergeConfig())
    assert torch.equal(mv, values) and torch.equal(mk, keys)
    one = torch.zeros(1, 2, 1, dtype=torch.long)
    mk, mv, _ = merge_uniform(keys, values, one, MergeConfig())
    assert mv.shape == (1, 2, 1, 4) and torch.isfinite(mv).all()
    ak, av, _ = merge_adaptive(keys, values, torch.zeros(1, 2, 10, dtype=torch.bool), MergeConfig())
    assert av is values and ak is keys
    everything = torch.ones(1, 2, 10, dtype=torch.bool)  # no survivor at all: nothing to merge into
    _, av, stats = merge_adaptive(keys, values, everything, MergeConfig(), with_stats=True)
    assert torch.equal(av, values) and stats.merged.sum() == 0


def test_inputs_are_not_modified():
    keys, values = random_cache(1, 2, 20, 4, 14)
    k0, v0 = keys.clone(), values.clone()
    kept = torch.randn(1, 2, 20).topk(5, -1).indices
    merge_uniform(keys, values, kept, MergeConfig(merge_keys=True))
    merge_adaptive(keys, values, torch.rand(1, 2, 20) > 0.5, MergeConfig(merge_keys=True))
    assert torch.equal(keys, k0) and torch.equal(values, v0)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"similarity_threshold": 1.5}, ValueError),
        ({"similarity_threshold": -1.01}, ValueError),
        ({"similarity_threshold": float("nan")}, ValueError),
        ({"merge_fraction": 0.0}, ValueError),
        ({"merge_fraction": 1.2}, ValueError),
        ({"max_merge_per_token": -1}, ValueError),
        ({"max_merge_per_token": 1.5}, TypeError),
        ({"merge_error_gate": -0.1}, ValueError),
    ],
)
def test_bad_config(kwargs, error):
    with pytest.raises(error):
        MergeConfig(**kwargs)


def test_bad_tensors():
    keys, values = random_cache(1, 2, 10, 4, 15)
    kept = torch.arange(4).expand(1, 2, 4)
    with pytest.raises(ValueError, match="equal shape"):
        merge_uniform(keys, values[..., :3], kept, MergeConfig())
    with pytest.raises(ValueError, match="kept_indices"):
        merge_uniform(keys, values, kept[0], MergeConfig())
    with pytest.raises(ValueError, match="distinct"):
        merge_uniform(keys, values, torch.zeros(1, 2, 3, dtype=torch.long), MergeConfig())
    with pytest.raises(ValueError, match="evicted"):
        merge_adaptive(keys, values, torch.zeros(1, 2, 9, dtype=torch.bool), MergeConfig())
    with pytest.raises(ValueError, match="both"):
        ev = torch.zeros(1, 2, 10, dtype=torch.bool)
        ev[0, 0, 0] = True
        merge_adaptive(keys, values, ev, MergeConfig(), survivors=ev.clone())
