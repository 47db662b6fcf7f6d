"""MergingPress through kvpress's pipeline with the embedded SmolLM2-135M model."""

import pytest
import torch
from kvpress import (
    AdaKVPress,
    DecodingPress,
    DMSPress,
    ExpectedAttentionPress,
    KnormPress,
    KVPressTextGenerationPipeline,
    SnapKVPress,
)
from transformers import DynamicCache

from mergepress import MergingDecodingPress, MergingPress
from mergepress.ruler.sources import essay_text

NEEDLE = "7481923"
QUESTION = "What is the special magic number for purple-elephant mentioned in the provided text?"
PREFIX = " The special magic number for purple-elephant mentioned in the provided text is"


@pytest.fixture(scope="module")
def pipe(smollm2):
    model, tokenizer = smollm2
    return KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def context():
    words = essay_text().split(" ")[:500]  # ~640 tokens
    words.insert(250, f"The special magic number for purple-elephant is {NEEDLE}.")
    return " ".join(words)


def ask(pipe, context, press, max_new_tokens=10):
    cache = DynamicCache()
    with torch.no_grad():
        answer = pipe(
            context, question=QUESTION, answer_prefix=PREFIX, press=press, max_new_tokens=max_new_tokens, cache=cache
        )["answer"]
    return answer, [cache.get_seq_length(i) for i in range(len(cache))]


# Mild compression: the 135M model loses a 7-digit needle quickly (see README).
PRESSES = {
    "knorm": lambda: KnormPress(0.05),
    "snapkv": lambda: SnapKVPress(0.05),
    "expected_attention": lambda: ExpectedAttentionPress(0.05),
    "adakv_snapkv": lambda: AdaKVPress(SnapKVPress(0.05)),
    "dms_knorm": lambda: DMSPress(KnormPress(), threshold=-26.0, sliding_window_size=64),
}


@pytest.mark.parametrize("name", PRESSES)
def test_merging_press_answers_the_needle(pipe, context, name):
    plain = PRESSES[name]()
    merged = MergingPress(PRESSES[name](), diagnostics=True)
    _, plain_lengths = ask(pipe, context, plain)
    answer, lengths = ask(pipe, context, merged)
    assert NEEDLE in answer, answer
    assert lengths == plain_lengths, "merging must not change how many tokens are cached"
    df = merged.diagnostics_frame()
    assert df["merged"].sum() > 0, "nothing was merged: the test does not exercise the merge"
    if name == "dms_knorm":
        assert merged.compression_ratio == pytest.approx(plain.compression_ratio)


def test_no_press_answers_the_needle(pipe, context):
    assert NEEDLE in ask(pipe, context, None)[0]


def test_merging_decoding_press(pipe, context):
    def make(**kwargs):
        return MergingDecodingPress(
            base_press=KnormPress(), compression_interval=4, target_size=400, hidden_states_buffer_size=0, **kwargs
        )

    closed = make(similarity_threshold=1.0)
    plain = DecodingPress(base_press=KnormPress(), compression_interval=4, target_size=400, hidden_states_buffer_size=0)
    assert ask(pipe, context, closed, 12) == ask(pipe, context, plain, 12), "closed gates must equal DecodingPress"

    merging = make(diagnostics=True)
    _, lengths = ask(pipe, context, merging, 12)
    df = merging.diagnostics_frame()
    assert set(df["phase"]) == {"decoding"} and df["merged"].sum() > 0
    assert max(lengths) <= 400 + 4, "the cache is cut back to target_size every 4 steps"
