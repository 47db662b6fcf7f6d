"""Prefill once, press many times.

During a kvpress prefill every layer attends over its full, uncompressed keys and values; the
press only shrinks what is cached afterwards. The hidden states, keys and values each layer's
press hook sees are therefore the same whatever the press. :func:`capture_prefill` records them
once per context; :func:`apply_press` replays the hook of any press on them — scorer, mask-based,
hook-based or merging, through the press's own ``forward_hook`` — and returns the cache kvpress
would have left. Decoding then runs exactly as in ``KVPressTextGenerationPipeline``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from kvpress import BasePress, DecodingPress, DMSPress, KVPressTextGenerationPipeline, PrefillDecodingPress
from kvpress.presses.base_press import SUPPORTED_MODELS
from torch import nn
from transformers import DynamicCache, Gemma3ForConditionalGeneration, PreTrainedModel


@dataclass
class LayerInputs:
    """What one layer's press hook receives during the prefill.

    ``keys, values (B, H, L, D)`` are the layer's full cache; ``kwargs`` the attention module's
    keyword arguments (``hidden_states (B, L, d_model)``, ``position_embeddings``,
    ``cache_position``, ...) without the cache; ``output`` the attention module's output.
    """

    module: nn.Module
    kwargs: dict
    output: tuple
    keys: torch.Tensor
    values: torch.Tensor


def check_model(model: PreTrainedModel) -> None:
    """Refuse a model kvpress does not support, naming the supported families."""
    if not isinstance(model, SUPPORTED_MODELS):
        names = ", ".join(m.__name__ for m in SUPPORTED_MODELS)
        raise ValueError(f"kvpress does not support {type(model).__name__}; supported models: {names}")


def _decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The layers a kvpress press hooks (Gemma3: global-attention layers only)."""
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    layers = list(lm.layers)
    if isinstance(model, Gemma3ForConditionalGeneration):
        layers = [layer for layer in layers if not layer.self_attn.is_sliding]
    return layers


@torch.no_grad()
def capture_prefill(model: PreTrainedModel, context_ids: torch.Tensor) -> list[LayerInputs]:
    """Prefill ``context_ids (1, L)`` without a press; record every layer's hook inputs."""
    captured: list[LayerInputs] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        rest = {k: v for k, v in kwargs.items() if k != "past_key_values"}
        captured.append(LayerInputs(module, rest, output, layer.keys, layer.values))

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in _decoder_layers(model)]
    try:
        model.model(input_ids=context_ids, past_key_values=DynamicCache())
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def apply_press(model: PreTrainedModel, press: BasePress | None, captured: list[LayerInputs]) -> DynamicCache:
    """The cache a prefill with ``press`` would leave, rebuilt from the captured layer inputs.

    Layers are filled one by one, as in a real prefill, and each press hook sees the cache in the
    state it would see there. Like kvpress's attention patch at prefill, every layer's
    ``masked_key_indices`` starts as None.
    """
    for layer in _decoder_layers(model):
        layer.self_attn.masked_key_indices = None
    cache = DynamicCache()
    prefill_press = press is not None and not isinstance(press, DecodingPress)
    with press(model) if prefill_press else contextlib.nullcontext():
        for inputs in captured:
            # clone: a press may modify the tensors it is given; the capture serves every press
            cache.update(inputs.keys.clone(), inputs.values.clone(), inputs.module.layer_idx)
            if prefill_press:
                kwargs = dict(inputs.kwargs, past_key_values=cache)
                press.forward_hook(inputs.module, (), kwargs, inputs.output)
    return cache


def compresses_while_decoding(press: BasePress | None) -> bool:
    """The pipeline's rule: only decoding presses and DMS with ``decoding=True`` stay active."""
    if isinstance(press, (DecodingPress, PrefillDecodingPress)):
        return True
    return isinstance(press, DMSPress) and press.decoding


def achieved_ratio(model: PreTrainedModel, cache: DynamicCache, context_length: int) -> float:
    """Fraction of the context's (layer, head, token) entries evicted or masked."""
    kept = total = 0
    for layer in _decoder_layers(model):
        keys = cache.layers[layer.self_attn.layer_idx].keys
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        n_masked = 0 if masked is None else len(masked[0])
        kept += keys.shape[0] * keys.shape[1] * keys.shape[2] - n_masked
        total += keys.shape[0] * keys.shape[1] * context_length
    return 1.0 - kept / total


@dataclass
class Prompt:
    """A tokenised sample: ``context_ids (1, L)``, ``question_ids (1, Q)`` (question, chat
    suffix and answer prefix, as the pipeline builds it) and ``reference_ids (1, A)``."""

    context_ids: torch.Tensor
    question_ids: torch.Tensor
    reference_ids: torch.Tensor


def tokenize(pipe: KVPressTextGenerationPipeline, context: str, question: str, answer_prefix: str, reference: str):
    """Tokenise one sample exactly as ``KVPressTextGenerationPipeline.preprocess`` does."""
    max_length = min(pipe.tokenizer.model_max_length, int(1e10))
    inputs = pipe.preprocess(context, [question], answer_prefix, max_length)
    ref = pipe.tokenizer.encode(reference, return_tensors="pt", add_special_tokens=False)
    device = pipe.model.device
    return Prompt(inputs["context_ids"].to(device), inputs["questions_ids"][0].to(device), ref.to(device))


@torch.no_grad()
def answer_and_nll(
    pipe: KVPressTextGenerationPipeline,
    press: BasePress | None,
    cache: DynamicCache,
    prompt: Prompt,
    max_new_tokens: int,
) -> tuple[str, float]:
    """Greedy answer (the pipeline's own ``generate_answer``) and the mean per-token negative
    log-likelihood of the reference answer, teacher-forced after the question, under ``cache``."""
    context_length = prompt.context_ids.shape[1]
    lengths = [cache.get_seq_length(i) for i in range(len(cache))]
    with press(pipe.model) if compresses_while_decoding(press) else contextlib.nullcontext():
        answer = pipe.generate_answer(prompt.question_ids, cache, context_length, max_new_tokens)
    pipe._remove_answer_from_cache(cache, lengths)  # back to the compressed context
    n_ref = prompt.reference_ids.shape[1]
    if n_ref == 0:
        return answer, math.nan
    ids = torch.cat([prompt.question_ids, prompt.reference_ids], dim=1)
    positions = torch.arange(context_length, context_length + ids.shape[1], device=ids.device).unsqueeze(0)
    logits = pipe.model(input_ids=ids, past_key_values=cache, position_ids=positions).logits[0, -n_ref - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits.float(), prompt.reference_ids[0], reduction="mean")
    pipe._remove_answer_from_cache(cache, lengths)
    return answer, float(nll)


def timed(fn, *args):
    """``(result, seconds)`` of ``fn(*args)``."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start
