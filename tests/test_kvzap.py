"""KVzap surrogates: KVzip+ targets, weights files, the offline loader and the shipped weights."""

import math

import pytest
import torch
from kvpress import DMSPress, KVPressTextGenerationPipeline
from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import repeat_kv

from mergepress import MergingPress
from mergepress.kvzap import (
    KVzapPress,
    KVzapWeightsError,
    RepeatPrompt,
    collect_targets,
    load_surrogate,
    model_fingerprint,
    read_metadata,
    repeat_prompt,
    save_surrogate,
    shipped_thresholds,
    shipped_weights,
)
from mergepress.kvzap.collect import TargetSet
from mergepress.kvzap.evaluate import dms_ratio, solve_threshold, surrogate_scores
from mergepress.kvzap.train import fit_linear, fit_mlp, fit_report, predict
from mergepress.ruler.sources import essay_text
from mergepress.sweep import apply_press, capture_prefill


def tiny_model(attn: str = "eager", layers: int = 2, heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=1024,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def direct_kvzip_plus(model: LlamaForCausalLM, prompt: RepeatPrompt) -> torch.Tensor:
    """The KVzip+ target from eager attention weights, the way the formula reads: (layers, n_ctx, H_kv)."""
    inputs = {}

    def hook(module, args, kwargs, output):
        inputs[module.layer_idx] = kwargs["hidden_states"]

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        out = model.model(prompt.input_ids, output_attentions=True)
    for h in handles:
        h.remove()
    cfg = model.config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    targets = []
    for layer_idx, layer in enumerate(model.model.layers):
        attn = out.attentions[layer_idx][0]  # (H, T, T), rows sum to 1
        x = inputs[layer_idx][0]  # (T, d)
        v = repeat_kv(out.past_key_values.layers[layer_idx].values, groups)[0]  # (H, T, D)
        w_o = layer.self_attn.o_proj.weight  # (d, H * D)
        wov = torch.stack([(v[h] @ w_o[:, h * 16 : (h + 1) * 16].T).norm(dim=-1) for h in range(v.shape[0])])  # (H, T)
        s = attn / x.norm(dim=-1)[None, :, None] * wov[:, None, :]
        s = s[:, prompt.repeat, prompt.context].amax(dim=1)  # (H, n_ctx): max over the repeated queries
        s = s.view(cfg.num_key_value_heads, groups, -1).amax(dim=1)  # max over the group
        targets.append(s.log().T)
    return torch.stack(targets)


@pytest.mark.parametrize("heads,kv_heads,chunk", [(4, 2, 5), (4, 4, 256), (6, 2, 7)])
def test_collector_matches_direct_max_attention(heads, kv_heads, chunk):
    model = tiny_model(heads=heads, kv_heads=kv_heads)
    ids = torch.randint(0, 128, (1, 70))
    prompt = RepeatPrompt(ids, context=slice(6, 30), repeat=slice(40, 64))
    hidden, scores = collect_targets(model, prompt, chunk_size=chunk)
    assert hidden.shape == (2, 24, 64) and scores.shape == (2, 24, kv_heads)
    torch.testing.assert_close(scores, direct_kvzip_plus(model, prompt), rtol=1e-4, atol=1e-4)


def test_collector_is_independent_of_attention_implementation():
    ids = torch.randint(0, 128, (1, 50))
    prompt = RepeatPrompt(ids, context=slice(3, 20), repeat=slice(30, 47))
    eager = collect_targets(tiny_model("eager"), prompt)
    sdpa = collect_targets(tiny_model("sdpa"), prompt)
    torch.testing.assert_close(eager, sdpa, rtol=1e-4, atol=1e-4)


def test_repeat_prompt_spans(smollm2):
    _, tokenizer = smollm2
    text = " ".join(essay_text().split(" ")[:60])
    p = repeat_prompt(tokenizer, text)
    ids = p.input_ids[0]
    assert torch.equal(ids[p.context], ids[p.repeat])
    assert tokenizer.decode(ids[p.context]) == text
    between = tokenizer.decode(ids[p.context.stop : p.repeat.start])
    assert "Repeat the previous context exactly." in between and "assistant" in between


def random_kvzap(hidden_dim: int | None, dtype: torch.dtype = torch.float32, n_modules: int = 3) -> KVzapModel:
    torch.manual_seed(1)
    config = KVzapConfig(input_dim=64, output_dim=2, hidden_dim=hidden_dim, n_modules=n_modules)
    model = KVzapModel(config).to(dtype)
    for p in model.parameters():
        p.data.normal_()
    return model


FINGERPRINT = {"architecture": "LlamaForCausalLM", "hidden_size": 64}


@pytest.mark.parametrize("hidden_dim", [None, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, hidden_dim, dtype):
    model = random_kvzap(hidden_dim, dtype)
    path = save_surrogate(model, tmp_path / "w.safetensors", FINGERPRINT, {"note": "x"})
    back = load_surrogate(path, FINGERPRINT)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == a[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert back.config.hidden_dim == hidden_dim and back.config.n_modules == 3
    meta = read_metadata(path)
    assert meta["fingerprint"] == FINGERPRINT and meta["info"] == {"note": "x"}
    assert meta["model_type"] == ("linear" if hidden_dim is None else "mlp")


def test_missing_weights_file_names_the_file(tmp_path):
    path = tmp_path / "absent" / "mlp.safetensors"
    with pytest.raises(FileNotFoundError, match="absent/mlp.safetensors"):
        load_surrogate(path)
    press = KVzapPress(model_type="mlp", weights=path)
    with pytest.raises(FileNotFoundError, match="absent/mlp.safetensors"):
        press.post_init_from_model(tiny_model())


def _corrupt(path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif how == "flipped_byte":
        raw[-5] ^= 0xFF  # inside the last tensor's data: only the checksum can tell
        path.write_bytes(raw)
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "garbage", "flipped_byte", "empty"])
def test_corrupt_weights_file_names_the_file(tmp_path, how):
    path = save_surrogate(random_kvzap(8), tmp_path / "mlp.safetensors", FINGERPRINT)
    _corrupt(path, how)
    with pytest.raises(KVzapWeightsError, match=str(path)):
        load_surrogate(path)
    with pytest.raises(KVzapWeightsError, match=str(path)):
        KVzapPress(model_type="mlp", weights=path).post_init_from_model(tiny_model())


def test_weights_for_another_model_or_type_are_refused(tmp_path):
    model = tiny_model()
    other = dict(model_fingerprint(model.config), hidden_size=576)
    path = save_surrogate(random_kvzap(8, n_modules=2), tmp_path / "mlp.safetensors", other)
    with pytest.raises(KVzapWeightsError, match="trained for another model"):
        KVzapPress(model_type="mlp", weights=path).post_init_from_model(model)
    path = save_surrogate(
        random_kvzap(None, n_modules=2), tmp_path / "lin.safetensors", model_fingerprint(model.config)
    )
    with pytest.raises(KVzapWeightsError, match="linear model, not 'mlp'"):
        KVzapPress(model_type="mlp", weights=path).post_init_from_model(model)


def test_unknown_model_offline_gives_a_clear_error():
    model = tiny_model()  # nothing shipped for it, and the hub is unreachable (HF_HUB_OFFLINE)
    assert shipped_weights(model.config, "mlp") is None
    with pytest.raises(KVzapWeightsError, match="python -m mergepress.kvzap train"):
        KVzapPress(model_type="mlp").post_init_from_model(model)
    with pytest.raises(AttributeError, match="post_init_from_model"):
        KVzapPress().score(model.model.layers[0].self_attn, torch.zeros(1, 3, 64), None, None, None, {})


def test_dms_rule_matches_dmspress_and_calibration_hits_target(tmp_path):
    model = tiny_model("sdpa")
    path = save_surrogate(random_kvzap(8, n_modules=2), tmp_path / "mlp.safetensors", model_fingerprint(model.config))
    captured = capture_prefill(model, torch.randint(0, 128, (1, 300)))
    scorer = KVzapPress(weights=path)
    scorer.post_init_from_model(model)
    scores = surrogate_scores(scorer, captured)
    assert scores.shape == (2, 2, 300)
    for threshold in (-1.0, 0.0, 0.5):
        dms = DMSPress(KVzapPress(weights=path), threshold=threshold)
        apply_press(model, dms, captured)
        assert dms.compression_ratio == pytest.approx(dms_ratio(scores, threshold), abs=1e-12)
    t = solve_threshold([scores], 0.3)
    assert dms_ratio(scores, t) == pytest.approx(0.3, abs=2 / 300)


def test_fits_recover_a_known_relation():
    torch.manual_seed(0)
    x = torch.randn(2, 1200, 16) * 2 + 1
    w = torch.randn(2, 16, 3)
    y = torch.bmm(x, w) - 4 + 0.01 * torch.randn(2, 1200, 3)
    data = TargetSet(x.half(), y, torch.arange(1200) // 40)
    linear, alphas = fit_linear(data, progress=False)
    report = fit_report(predict(linear, data.hidden), y)
    assert report["r2"].min() > 0.999 and report["spearman"].min() > 0.99 and len(alphas) == 2
    mlp, history = fit_mlp(data, hidden_dim=16, epochs=3, lr=3e-2, batch_size=128, progress=False)
    assert history[-1]["val"] < history[0]["val"]
    assert fit_report(predict(mlp, data.hidden), y)["r2"].min() > 0.9


# --- the shipped surrogates of the embedded model ---------------------------------------------


@pytest.fixture(scope="module")
def short_context():
    return " ".join(essay_text().split(" ")[:220])


@pytest.mark.parametrize("model_type", ["linear", "mlp"])
def test_shipped_weights_load_offline_for_the_embedded_model(smollm2, model_type):
    model, _ = smollm2
    path = shipped_weights(model.config, model_type)
    assert path is not None and path.is_file() and path.stat().st_size < 5e6
    press = KVzapPress(model_type=model_type)
    press.post_init_from_model(model)
    assert press.kvzap_model.config.n_modules == model.config.num_hidden_layers
    thresholds = shipped_thresholds(model.config, model_type)
    assert {"0.5", "0.75", "0.875"} <= thresholds.keys()
    assert thresholds["0.5"] < thresholds["0.75"] < thresholds["0.875"]


def test_kvzap_presses_run_through_pipeline_and_sweep_engine(smollm2, short_context):
    model, tokenizer = smollm2
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    threshold = shipped_thresholds(model.config, "mlp")["0.5"]
    presses = {
        "scorer": KVzapPress(compression_ratio=0.5, model_type="linear"),
        "dms": DMSPress(KVzapPress(model_type="mlp"), threshold=threshold, sliding_window_size=32),
        "merging_dms": MergingPress(
            DMSPress(KVzapPress(model_type="mlp"), threshold=threshold, sliding_window_size=32)
        ),
    }
    for name, press in presses.items():
        cache = DynamicCache()
        with torch.no_grad():
            answer = pipe(short_context, question="Who wrote this?", press=press, max_new_tokens=3, cache=cache)
        assert isinstance(answer["answer"], str), name
    ratio = presses["dms"].compression_ratio
    assert 0.05 < ratio < 0.95 and not math.isnan(ratio)
    assert presses["merging_dms"].compression_ratio == pytest.approx(ratio)

    ids = tokenizer(short_context, return_tensors="pt").input_ids
    captured = capture_prefill(model, ids)
    press = DMSPress(KVzapPress(model_type="mlp"), threshold=threshold)
    apply_press(model, press, captured)
    merged = MergingPress(DMSPress(KVzapPress(model_type="mlp"), threshold=threshold))
    apply_press(model, merged, captured)
    assert merged.compression_ratio == pytest.approx(press.compression_ratio) and press.compression_ratio > 0
