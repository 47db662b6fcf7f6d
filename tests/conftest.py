"""Shared fixtures: a tiny random Llama (fast, offline) and the embedded SmolLM2 model."""

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Two threads (the CI machine's cores) unless OMP_NUM_THREADS says otherwise: more threads than free
# cores makes every parallel region wait for a descheduled thread, 10-20x slower.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    """Two layers, 4 query heads sharing 2 KV heads of size 16: every press runs in milliseconds."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (converted once into the mergepress cache)."""
    from mergepress.models import load_model

    return load_model("smollm2-135m", device="cpu")
