"""KVzip+ importance targets by the "repeat the context" method.

The model reads ``<user> context + "Repeat the previous context exactly." <assistant> context``.
For layer ``l``, query head ``h`` (in KV group ``g``), query ``t`` of the repeated copy and
token ``i`` of the first copy, the KVzip+ score is

    s[h, t, i] = A[h, t, i] / ||x_t|| * ||W_O^h v_i||

where ``A`` is the causal softmax attention over the whole sequence, ``x_t`` the attention input
(hidden state after the layer's input norm) of query ``t`` and ``W_O^h v_i`` what value ``i``
writes into the residual stream through head ``h``'s slice of the output projection. The
target of token ``i`` for KV head ``g`` is ``log max_{h in g, t} s[h, t, i]``.

Everything is computed in the log domain from the post-RoPE queries and the cached keys, one
chunk of queries at a time, so no ``(T, T)`` attention matrix is ever materialised for all
heads and no attention weight underflows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kvpress.utils import extract_keys_and_values, get_prerope_query_states
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.llama.modeling_llama import rotate_half

REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly."


@dataclass(frozen=True)
class RepeatPrompt:
    """A tokenised repeat prompt and where the two copies of the context sit in it.

    ``input_ids`` has shape ``(1, T)``; ``context`` and ``repeat`` are token slices of equal
    length, and token ``context.start + k`` is the same token as ``repeat.start + k``.
    """

    input_ids: torch.Tensor
    context: slice
    repeat: slice


def repeat_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> RepeatPrompt:
    """Build the KVzip repeat prompt for ``text`` with the tokenizer's chat template.

    The chat template is rendered around two sentinels, and the pieces (template prefix,
    context, instruction and assistant header, context, template suffix) are tokenised
    separately and concatenated, so both copies are tokenised identically and their spans
    are exact. Without a chat template the prompt is ``bos + text + instruction + "\\n" + text``.
    """
    text = text.strip()
    if not text:
        raise ValueError("repeat_prompt needs a non-empty text")
    first, second = "\x00MERGEPRESS_CONTEXT_1\x00", "\x00MERGEPRESS_CONTEXT_2\x00"
    if tokenizer.chat_template is None:
        rendered = (tokenizer.bos_token or "") + first + REPEAT_INSTRUCTION + "\n" + second
    else:
        messages = [
            {"role": "user", "content": first + REPEAT_INSTRUCTION},
            {"role": "assistant", "content": second},
        ]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    prefix, rest = rendered.split(first)
    middle, suffix = rest.split(second)

    def encode(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False) if s else []

    ctx, pre, mid = encode(text), encode(prefix), encode(middle)
    ids = pre + ctx + mid + ctx + encode(suffix)
    start_ctx, start_rep = len(pre), len(pre) + len(ctx) + len(mid)
    return RepeatPrompt(
        input_ids=torch.tensor([ids]),
        context=slice(start_ctx, start_ctx + len(ctx)),
        repeat=slice(start_rep, start_rep + len(ctx)),
    )


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x (B, H, n, D)`` with ``cos, sin (B, n, D)``."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def value_output_log_norms(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """``log ||W_O^h v_i||`` for every query head ``h``: values ``(B, H_kv, n, D)`` -> ``(B, H, n)``."""
    n_heads = module.config.num_attention_heads
    d_head = values.shape[-1]
    groups = n_heads // values.shape[1]
    w_o = module.o_proj.weight.view(-1, n_heads, d_head).to(values.dtype)  # (d_model, H, D)
    v = values.repeat_interleave(groups, dim=1)  # (B, H, n, D), head h reads KV head h // groups
    return torch.einsum("mhd,bhnd->bhnm", w_o, v).norm(dim=-1).log()


def kvzip_plus_log_scores(
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    context: slice,
    repeat: slice,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Log KVzip+ scores of the context tokens for one attention layer.

    Parameters
    ----------
    module:
        The attention layer (Llama-like: ``q_proj``, ``o_proj``, ``head_dim``; plain causal softmax).
    hidden_states:
        Attention input of the whole prompt, ``(B, T, d_model)``.
    keys, values:
        Post-RoPE keys and values of the whole prompt, ``(B, H_kv, T, D)``.
    position_embeddings:
        ``(cos, sin)``, each ``(B, T, D)``, as the layer received them.
    context, repeat:
        Token slices of the first copy and of the repeated copy.
    chunk_size:
        Queries processed at once; peak memory is ``B * H * chunk_size * T`` floats.

    Returns
    -------
    torch.Tensor
        ``(B, H_kv, n_context)`` float32: ``log max_{h in group, t in repeat} A[h,t,i] / ||x_t|| * ||W_O^h v_i||``.
    """
    bsz, n_tokens, _ = hidden_states.shape
    n_heads = module.config.num_attention_heads
    n_kv = keys.shape[1]
    groups = n_heads // n_kv
    scaling = getattr(module, "scaling", module.head_dim**-0.5)
    n_ctx = context.stop - context.start
    keys = keys.float().repeat_interleave(groups, dim=1)  # (B, H, T, D)
    cos, sin = (p.float() for p in position_embeddings)
    hidden_states = hidden_states.float()
    key_pos = torch.arange(n_tokens, device=keys.device)

    best = torch.full((bsz, n_heads, n_ctx), -math.inf, device=keys.device)
    for start in range(repeat.start, repeat.stop, chunk_size):
        stop = min(start + chunk_size, repeat.stop)
        x = hidden_states[:, start:stop]
        q = get_prerope_query_states(module, x.to(module.q_proj.weight.dtype)).float()
        q = _apply_rope(q, cos[:, start:stop], sin[:, start:stop])  # (B, H, c, D)
        logits = torch.matmul(q, keys.transpose(-1, -2)) * scaling  # (B, H, c, T)
        query_pos = torch.arange(start, stop, device=keys.device)
        logits = logits.masked_fill(key_pos[None, :] > query_pos[:, None], -math.inf)
        log_attn = logits[..., context] - logits.logsumexp(dim=-1, keepdim=True)  # (B, H, c, n_ctx)
        log_attn = log_attn - x.norm(dim=-1).log()[:, None, :, None]
        best = torch.maximum(best, log_attn.amax(dim=2))
    scores = best + value_output_log_norms(module, values[:, :, context].float())
    return scores.view(bsz, n_kv, groups, n_ctx).amax(dim=2)


@torch.no_grad()
def collect_targets(
    model: PreTrainedModel,
    prompt: RepeatPrompt,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the repeat prompt through ``model`` and return features and KVzip+ targets.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``hidden (n_layers, n_context, d_model)``: each layer's attention input for the first
        copy of the context (what KVzapPress sees at inference), in the model's dtype, and
        ``log_scores (n_layers, n_context, H_kv)`` float32.
    """
    layers = model.model.layers
    hidden: list[torch.Tensor | None] = [None] * len(layers)
    scores: list[torch.Tensor | None] = [None] * len(layers)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        idx = int(module.layer_idx)
        h = kwargs["hidden_states"]
        keys, values = extract_keys_and_values(kwargs["past_key_values"], idx)
        s = kvzip_plus_log_scores(
            module, h, keys, values, kwargs["position_embeddings"], prompt.context, prompt.repeat, chunk_size
        )
        hidden[idx] = h[0, prompt.context].detach().cpu()
        scores[idx] = s[0].transpose(0, 1).cpu()
        return output

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    try:
        model.model(input_ids=prompt.input_ids.to(model.device))
    finally:
        for handle in handles:
            handle.remove()
    if any(h is None for h in hidden):
        raise RuntimeError(
            "some attention layers were not reached: is this a decoder-only model with model.model.layers"
        )
    return torch.stack(hidden), torch.stack(scores)
