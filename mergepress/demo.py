"""A short demo: compress a real context with the embedded model, evicting vs merging.

``python -m mergepress.demo [--ratio 0.25] [--words 500]`` hides a needle in a Paul Graham
essay, compresses the context with KnormPress and with MergingPress(KnormPress), and prints
each answer with the number of cached tokens and the merge diagnostics.
"""

from __future__ import annotations

import argparse
import time

import torch
from kvpress import KnormPress, KVPressTextGenerationPipeline
from transformers import DynamicCache

from mergepress import MergingPress, load_model
from mergepress.ruler.sources import essay_text

NEEDLE = "The special magic number for purple-elephant is 7481923."
QUESTION = "What is the special magic number for purple-elephant mentioned in the provided text?"
PREFIX = " The special magic number for purple-elephant mentioned in the provided text is"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name, HF model id or local path")
    parser.add_argument("--ratio", type=float, default=0.25, help="compression ratio of KnormPress")
    parser.add_argument("--words", type=int, default=500, help="essay words in the context")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    words = essay_text().split(" ")[: args.words]
    words.insert(len(words) // 2, NEEDLE)
    context = " ".join(words)
    print(f"context: {len(tokenizer(context).input_ids)} tokens, needle in the middle: {NEEDLE!r}\n")

    merging = MergingPress(KnormPress(args.ratio), diagnostics=True)
    for name, press in [
        ("no press", None),
        (f"KnormPress({args.ratio})", KnormPress(args.ratio)),
        (f"MergingPress(KnormPress({args.ratio}))", merging),
    ]:
        cache = DynamicCache()
        start = time.perf_counter()
        with torch.no_grad():
            answer = pipe(context, question=QUESTION, answer_prefix=PREFIX, press=press, cache=cache, max_new_tokens=12)
        seconds = time.perf_counter() - start
        cached = cache.get_seq_length()
        print(f"{name:38s} cached tokens/layer: {cached:4d}  {seconds:5.1f}s  answer: {answer['answer']!r}")

    df = merging.diagnostics_frame()
    mean_similarity = (df["mean_similarity"] * df["merged"]).sum() / df["merged"].sum()
    print(
        f"\nmerge diagnostics: {df['evicted'].sum()} evicted (token, head) pairs over {df['layer'].nunique()} layers, "
        f"{df['merged'].sum()} merged, mean similarity {mean_similarity:.3f}, "
        f"at most {df['max_absorbed'].max()} tokens folded into one survivor"
    )


if __name__ == "__main__":
    main()
