"""Generate a RULER suite for one model's tokenizer and save it as JSONL.

    python -m mergepress.ruler --model smollm2-135m --length 2048 --n 20 --out data/ruler-2048.jsonl \\
        [--tasks niah_single_1 vt ...] [--seed 42] [--qa-data DIR]
"""

from __future__ import annotations

import argparse
import sys

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mergepress.models import EMBEDDED, cache_dir, load_model
from mergepress.ruler.generator import generate_suite, length_table
from mergepress.ruler.jsonl import save_jsonl
from mergepress.ruler.tasks import ALL_TASKS


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model`` (embedded name, hub id or folder), without its weights when possible."""
    if model in EMBEDDED:
        folder = cache_dir() / model
        if not (folder / "tokenizer_config.json").exists():
            return load_model(model, device="cpu")[1]  # converts the embedded GGUF once
        return AutoTokenizer.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(model)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m mergepress.ruler", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name, hub id or folder")
    parser.add_argument("--length", type=int, required=True, help="target tokens per sample")
    parser.add_argument("--n", type=int, default=20, help="samples per task")
    parser.add_argument("--out", required=True, help="JSONL file to write (folders are created)")
    parser.add_argument("--tasks", nargs="+", default=list(ALL_TASKS), help="tasks (default: all 13)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--qa-data", default=None, help="folder with dev-v2.0.json and hotpot_dev_distractor_v1.json")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.model)
    try:
        df = generate_suite(
            args.tasks,
            n_samples=args.n,
            context_length=args.length,
            tokenizer=tokenizer,
            seed=args.seed,
            qa_data=args.qa_data,
            progress=True,
        )
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    path = save_jsonl(df, args.out)
    print(f"wrote {len(df)} samples to {path}")
    for task, reason in df.attrs["not_run"].items():
        print(f"{task}: {reason}")
    if len(df):
        print(f"length as % of the {args.length}-token target:")
        print(length_table(df, args.length).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
