"""Sweep engine vs. kvpress's pipeline run once per configuration, side by side in one run.

Nine configurations (no_press + KnormPress and MergingPress(KnormPress) at 4 ratios) on the same
RULER samples. For each sample the engine (one prefill, nine press replays and decodes, plus the
answer log-likelihood it also records) and the pipeline (nine full prefills and decodes) are
timed back to back, so machine noise hits both alike. Prints the per-sample and total ratio and
checks that both produced the same answers.

    python benchmarks/sweep_speed.py [--length 2048] [--tasks niah_single_1,niah_multikey_1,vt]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from kvpress import KVPressTextGenerationPipeline

from mergepress.models import load_model
from mergepress.ruler import generate_suite
from mergepress.sweep.engine import answer_and_nll, apply_press, capture_prefill, tokenize
from mergepress.sweep.registry import build_press
from mergepress.sweep.run import reference_text

CONFIGS = [("no_press", 0.0)] + [(name, r) for name in ("knorm", "merging_knorm") for r in (0.25, 0.5, 0.75, 0.875)]


def engine(pipe, sample) -> list[str]:
    prompt = tokenize(
        pipe, sample.context, sample.question, sample.answer_prefix, reference_text(sample.answer, sample.answer_prefix)
    )
    captured = capture_prefill(pipe.model, prompt.context_ids)
    answers = []
    for name, ratio in CONFIGS:
        press = build_press(name, ratio)
        cache = apply_press(pipe.model, press, captured)
        answers.append(answer_and_nll(pipe, press, cache, prompt, int(sample.max_new_tokens))[0])
    return answers


def pipeline(pipe, sample) -> list[str]:
    return [
        pipe(
            sample.context,
            question=sample.question,
            answer_prefix=sample.answer_prefix,
            press=build_press(name, ratio),
            max_new_tokens=int(sample.max_new_tokens),
        )["answer"]
        for name, ratio in CONFIGS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--tasks", default="niah_single_1,niah_multikey_1,vt")
    parser.add_argument("--n", type=int, default=1, help="samples per task")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (no more than free cores)")
    parser.add_argument("--out", default="results/benchmarks/sweep_speed.csv", help="per-sample timings (CSV)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    suite = generate_suite(
        tasks=args.tasks.split(","), n_samples=args.n, context_length=args.length, tokenizer=tokenizer
    )
    print(f"{len(suite)} samples x {len(CONFIGS)} configurations at {args.length} tokens, {args.threads} threads")
    rows = []
    with torch.no_grad():
        for sample in suite.itertuples():
            timings, answers = {}, {}
            for name, fn in (("engine", engine), ("pipeline", pipeline)):
                start = time.perf_counter()
                answers[name] = fn(pipe, sample)
                timings[name] = time.perf_counter() - start
            same = answers["engine"] == answers["pipeline"]
            rows.append({"task": sample.task, "index": sample.index, **timings, "same_answers": same})
            print(
                f"{sample.task:16s} engine {timings['engine']:6.1f}s  pipeline {timings['pipeline']:6.1f}s  "
                f"speed-up {timings['pipeline'] / timings['engine']:4.1f}x  same answers: {same}"
            )
    df = pd.DataFrame(rows)
    df["speed_up"] = df["pipeline"] / df["engine"]
    total = df["pipeline"].sum() / df["engine"].sum()
    print(f"total: engine {df['engine'].sum():.1f}s, pipeline {df['pipeline'].sum():.1f}s, speed-up {total:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        f.write(f"# python {' '.join(shlex.quote(a) for a in sys.argv)}\n")
        f.write(f"# total speed-up (pipeline / engine): {total:.3f}\n")
        df.to_csv(f, index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
