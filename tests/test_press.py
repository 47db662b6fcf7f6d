"""MergingPress on a tiny random Llama: upstream equivalence, the three press kinds, bad input."""

import contextlib

import pytest
import torch
from kvpress import (
    AdaKVPress,
    ChunkPress,
    CriticalAdaKVPress,
    DecodingPress,
    DMSPress,
    ExpectedAttentionPress,
    KnormPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
)
from kvpress import MergingPress as UpstreamMergingPress
from transformers import DynamicCache

from mergepress import MergingDecodingPress, MergingPress

L = 96


def prefill(model, press, batch=1, seed=0):
    """Run one prefill with ``press`` active; return the per-layer cache and each layer's mask."""
    ids = torch.randint(0, model.config.vocab_size, (batch, L), generator=torch.Generator().manual_seed(seed))
    cache = DynamicCache()
    with torch.no_grad(), press(model) if press is not None else contextlib.nullcontext():
        model.model(input_ids=ids, past_key_values=cache)
    layers = model.model.layers
    masks = [getattr(layer.self_attn, "masked_key_indices", None) for layer in layers]
    return [(lay.keys.clone(), lay.values.clone()) for lay in cache.layers], masks


def evicted_mask(indices, like):
    mask = torch.zeros(like.shape[:3], dtype=torch.bool)
    mask[indices[0], indices[1], indices[2]] = True
    return mask


@pytest.mark.parametrize("scorer", [KnormPress, lambda r: SnapKVPress(r, window_size=8)])
@pytest.mark.parametrize("threshold, fraction", [(0.0, 1.0), (0.0, 0.75), (0.3, 0.5)])
def test_same_cache_as_upstream(tiny_llama, scorer, threshold, fraction):
    ours, _ = prefill(tiny_llama, MergingPress(scorer(0.5), similarity_threshold=threshold, merge_fraction=fraction))
    theirs, _ = prefill(
        tiny_llama, UpstreamMergingPress(scorer(0.5), similarity_threshold=threshold, merge_fraction=fraction)
    )
    for (k0, v0), (k1, v1) in zip(ours, theirs):
        assert k0.shape == (1, 2, L // 2, 16)
        torch.testing.assert_close(k0, k1, rtol=0, atol=0)
        torch.testing.assert_close(v0, v1, rtol=1e-6, atol=1e-6)


def test_merge_method_matches_upstream():
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 3, 40, 8, generator=g), torch.randn(2, 3, 40, 8, generator=g)
    kept = torch.randn(2, 3, 40, generator=g).topk(13, -1).indices
    for kwargs in ({}, {"similarity_threshold": 0.2, "merge_fraction": 0.6}):
        k0, v0 = MergingPress(KnormPress(0.5), **kwargs).merge(keys, values, kept)
        k1, v1 = UpstreamMergingPress(KnormPress(0.5), **kwargs).merge(keys, values, kept)
        assert torch.equal(k0, k1)
        torch.testing.assert_close(v0, v1, rtol=1e-6, atol=1e-6)


def dms(threshold=0.0):
    # Knorm scores are -‖k‖ < 0: threshold 0 evicts every token that leaves the 16-token window.
    return DMSPress(KnormPress(), threshold=threshold, sliding_window_size=16)


@pytest.mark.parametrize(
    "make",
    [lambda: KnormPress(0.5), lambda: AdaKVPress(KnormPress(0.5)), lambda: CriticalAdaKVPress(KnormPress(0.5)), dms],
    ids=["scorer", "adakv", "critical_adakv", "dms"],
)
def test_closed_gates_equal_hard_eviction(tiny_llama, make):
    plain, plain_masks = prefill(tiny_llama, make())
    merged, merged_masks = prefill(tiny_llama, MergingPress(make(), similarity_threshold=1.0))
    opened, _ = prefill(tiny_llama, MergingPress(make()))
    for (k0, v0), (k1, v1), (_, v2) in zip(plain, merged, opened):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
        assert not torch.equal(v0, v2), "with the gates open the merge must change the cache"
    for m0, m1 in zip(plain_masks, merged_masks):
        assert (m0 is None) == (m1 is None)
        if m0 is not None:
            assert all(torch.equal(a, b) for a, b in zip(m0, m1)), "merging must not change what is evicted"


@pytest.mark.parametrize("make", [lambda: AdaKVPress(KnormPress(0.6)), dms], ids=["adakv", "dms"])
def test_masked_presses_keep_evicted_and_change_survivors(tiny_llama, make):
    plain, _ = prefill(tiny_llama, make())
    merged, masks = prefill(tiny_llama, MergingPress(make()))
    for (k0, v0), (k1, v1), idx in zip(plain, merged, masks):
        ev = evicted_mask(idx, v0)
        assert v1.shape == v0.shape, "masked presses keep full-length tensors"
        assert torch.equal(v1[ev], v0[ev]) and torch.equal(k1, k0)
        changed = (v1 != v0).any(-1)
        assert bool(changed[~ev].any()) and not bool(changed[ev].any())


def test_dms_shorter_than_window_merges_nothing(tiny_llama):
    press = MergingPress(DMSPress(KnormPress(), threshold=0.0, sliding_window_size=4 * L), diagnostics=True)
    plain, _ = prefill(tiny_llama, DMSPress(KnormPress(), threshold=0.0, sliding_window_size=4 * L))
    merged, _ = prefill(tiny_llama, press)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain, merged))
    assert press.compression_ratio == 0 and press.diagnostics_frame().empty


def test_merging_reduces_attention_output_error_on_clustered_cache():
    """Where evicted tokens have near-duplicate survivors, folding them in must beat dropping them."""
    from mergepress.kernels import MergeConfig, merge_adaptive

    g = torch.Generator().manual_seed(0)
    B, H, L_, D, C = 1, 4, 256, 32, 16
    centers_k, centers_v = torch.randn(B, H, C, D, generator=g) * 3, torch.randn(B, H, C, D, generator=g)
    assign = torch.randint(0, C, (B, H, L_), generator=g)
    pick = lambda c: c.gather(2, assign.unsqueeze(-1).expand(-1, -1, -1, D))  # noqa: E731
    keys = pick(centers_k) + 0.3 * torch.randn(B, H, L_, D, generator=g)
    values = pick(centers_v) + 0.3 * torch.randn(B, H, L_, D, generator=g)
    evicted = torch.rand(B, H, L_, generator=g) < torch.tensor([0.3, 0.5, 0.7, 0.8]).view(1, H, 1)
    _, merged, _ = merge_adaptive(keys, values, evicted, MergeConfig())
    queries = torch.randn(B, H, 64, D, generator=g) / D**0.5

    def attend(v, mask):
        logits = (queries @ keys.transpose(-1, -2)).masked_fill(mask.unsqueeze(2), float("-inf"))
        return logits.softmax(-1) @ v

    full = attend(values, torch.zeros_like(evicted))
    err_evict = (attend(values, evicted) - full).norm(dim=-1).mean()
    err_merge = (attend(merged, evicted) - full).norm(dim=-1).mean()
    assert err_merge < 0.9 * err_evict, (err_merge, err_evict)


def test_batch_of_two_matches_each_sample_alone(tiny_llama):
    ids = torch.randint(0, 128, (2, L), generator=torch.Generator().manual_seed(3))
    caches = []
    for batch in (ids, ids[:1], ids[1:]):
        cache = DynamicCache()
        with torch.no_grad(), MergingPress(KnormPress(0.5), max_merge_per_token=2)(tiny_llama):
            tiny_llama.model(input_ids=batch, past_key_values=cache)
        caches.append(cache.layers[0].values)
    torch.testing.assert_close(caches[0], torch.cat(caches[1:]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.0, 0.99])
def test_extreme_ratios(tiny_llama, ratio):
    plain, _ = prefill(tiny_llama, KnormPress(ratio))
    merged, _ = prefill(tiny_llama, MergingPress(KnormPress(ratio)))
    for (k0, _), (k1, v1) in zip(plain, merged):
        assert k1.shape == k0.shape and torch.isfinite(v1).all()
    if ratio == 0.0:
        assert all(torch.equal(a[1], b[1]) for a, b in zip(plain, merged))


def test_repeated_compression_of_the_same_cache(tiny_llama):
    press = MergingPress(KnormPress(0.5), merge_keys=True)
    keys, values = prefill(tiny_llama, None)[0][0]
    module = tiny_llama.model.layers[0].self_attn
    hidden = torch.randn(1, L, 64)
    for expected in (48, 24, 12):
        keys, values = press.compress(module, hidden[:, : keys.shape[2]], keys, values, None, {})
        assert keys.shape[2] == expected and torch.isfinite(values).all() and torch.isfinite(keys).all()


def test_diagnostics(tiny_llama):
    press = MergingPress(KnormPress(0.5), max_merge_per_token=1, diagnostics=True)
    prefill(tiny_llama, press)
    df = press.diagnostics_frame()
    assert len(df) == 2 * 2  # layers x KV heads
    assert (df["evicted"] == L // 2).all() and (df["gated_cap"] > 0).all() and (df["max_absorbed"] == 1).all()
    counts = df[["merged", "gated_threshold", "gated_fraction", "gated_error", "gated_cap", "zero_weight"]]
    assert (counts.sum(axis=1) == df["evicted"]).all()
    assert (df["min_similarity"] <= df["mean_similarity"]).all() and set(df["phase"]) == {"prefill"}
    prefill(tiny_llama, press)  # a new application starts a new record
    assert len(press.diagnostics_frame()) == 4
    quiet = MergingPress(KnormPress(0.5))
    prefill(tiny_llama, quiet)
    assert quiet.diagnostics_frame().empty


def test_passthrough_properties():
    press = MergingPress(KnormPress(0.25))
    press.compression_ratio = 0.5
    assert press.press.compression_ratio == 0.5
    with pytest.raises(AttributeError):
        press.threshold  # noqa: B018
    d = MergingPress(DMSPress(KnormPress(), threshold=-3.0))
    d.threshold = -4.0
    assert d.press.threshold == -4.0
    with pytest.raises(AttributeError):
        d.compression_ratio = 0.5


@pytest.mark.parametrize(
    "press, match",
    [
        ("knorm", "cannot wrap str"),
        (None, "cannot wrap NoneType"),
        (StreamingLLMPress(0.5), None),  # a ScorerPress: supported
        (ChunkPress(KnormPress(0.5)), "cannot wrap ChunkPress"),
        (PyramidKVPress(0.5), "overrides ScorerPress.compress"),
        (DecodingPress(base_press=KnormPress()), "MergingDecodingPress"),
        (MergingPress(KnormPress(0.5)), "cannot wrap MergingPress"),
    ],
)
def test_unsupported_presses(press, match):
    if match is None:
        MergingPress(press)
        return
    with pytest.raises(TypeError, match=match) as err:
        MergingPress(press)
    assert "AdaKVPress" in str(err.value) or "MergingDecodingPress" in str(err.value) or "top-k" in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"similarity_threshold": 1.01},
        {"similarity_threshold": -2},
        {"merge_fraction": 0},
        {"merge_fraction": 1.5},
        {"max_merge_per_token": -1},
        {"merge_error_gate": -1e-3},
    ],
)
def test_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        MergingPress(KnormPress(0.5), **kwargs)
    with pytest.raises(ValueError):
        MergingDecodingPress(base_press=KnormPress(), **kwargs)
    press = MergingPress(KnormPress(0.5))
    with pytest.raises(ValueError):
        setattr(press, *next(iter(kwargs.items())))


def test_decoding_press_needs_a_scorer():
    with pytest.raises(TypeError, match="ScorerPress or AdaKVPress"):
        MergingDecodingPress(base_press=DMSPress(KnormPress()))


def test_expected_attention_is_wrapped_as_scorer(tiny_llama):
    plain, _ = prefill(tiny_llama, ExpectedAttentionPress(0.5))
    merged, _ = prefill(tiny_llama, MergingPress(ExpectedAttentionPress(0.5)))
    assert all(a[0].shape == b[0].shape for a, b in zip(plain, merged))
