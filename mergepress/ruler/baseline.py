"""Score a model on RULER without compression, through kvpress's text-generation pipeline.

    python -m mergepress.ruler.baseline --model smollm2-135m --length 2048 --n 20 --seed 42 \\
        --out results/ruler_baseline_2048.csv [--data data/ruler-2048.jsonl] [--note "..."]

Writes the per-task scores (CSV) and a sidecar ``.md`` with the command, package versions,
git commit and date, so the numbers can be reproduced.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from kvpress import BasePress, KVPressTextGenerationPipeline
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergepress.models import load_model
from mergepress.ruler.generator import generate_suite, length_table
from mergepress.ruler.jsonl import load_jsonl
from mergepress.ruler.scoring import score
from mergepress.ruler.tasks import OFFLINE_TASKS, QA_TASKS


def predict(
    df: pd.DataFrame,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    press: BasePress | None = None,
    progress: bool = True,
) -> list[str]:
    """Answers of ``model`` to every row of a RULER frame, with ``press`` (None: no compression)."""
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    answers = []
    for row in tqdm(df.itertuples(index=False), total=len(df), desc="RULER baseline", disable=not progress):
        out = pipe(
            row.context,
            question=row.question,
            answer_prefix=row.answer_prefix,
            press=press,
            max_new_tokens=int(row.max_new_tokens),
        )
        answers.append(out["answer"])
    return answers


def results_table(df: pd.DataFrame, scores: dict[str, float | str]) -> pd.DataFrame:
    """One row per task (qa tasks that were not run keep their reason as score) and the mean."""
    counts = df["task"].value_counts()
    rows = []
    for task in [t for t in scores if t != "mean"]:  # score() lists tasks in benchmark order
        metric = "string_match_part" if task in QA_TASKS else "string_match_all"
        rows.append((task, metric, int(counts.get(task, 0)), scores[task]))
    run = sum(isinstance(v, float) for k, v in scores.items() if k != "mean")
    rows.append(("mean", f"unweighted mean over {run} tasks run", len(df), scores["mean"]))
    return pd.DataFrame(rows, columns=["task", "metric", "n", "score"])


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
    ).stdout.strip()


def _git_commit() -> str:
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--", str(Path(__file__).parents[1]))
    except (OSError, subprocess.CalledProcessError):
        return "none (not a git checkout, or no commit yet)"
    return commit + (" (with uncommitted changes under mergepress/)" if dirty else "")


def _sidecar(table: pd.DataFrame, df: pd.DataFrame, command: str, minutes: float, note: str) -> str:
    versions = {p: _version(p) for p in ("torch", "transformers", "kvpress", "mergepress")}
    header = df.attrs
    lines = [
        f"# RULER baseline, {header['length']} tokens, no compression",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        *(f"- {p}: {v}" for p, v in versions.items()),
        f"- mergepress git commit: {_git_commit()}",
        f"- python {platform.python_version()}, torch threads {torch.get_num_threads()}",
        f"- data: generator version {header['generator_version']}, tokenizer {header['tokenizer']}, "
        f"seed {header['seed']}, sources {header.get('sources', {})}",
        "- pipeline: kvpress KVPressTextGenerationPipeline, press=None, greedy decoding",
        f"- runtime: {minutes:.1f} min",
    ]
    if note:
        lines += ["", f"Note: {note}"]
    lines += ["", "## Scores", "", table.to_markdown(index=False)]
    lines += ["", "## Sample lengths (% of target)", "", length_table(df, header["length"]).to_markdown(index=False)]
    return "\n".join(lines) + "\n"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    argv = sys.argv[1:] if argv is None else argv
    prog = "python -m mergepress.ruler.baseline"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--n", type=int, default=20, help="samples per task")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tasks", nargs="+", default=list(OFFLINE_TASKS))
    parser.add_argument("--qa-data", default=None)
    parser.add_argument("--data", default=None, help="read this saved suite instead of generating one")
    parser.add_argument("--out", required=True, help="CSV of scores; the sidecar .md goes next to it")
    parser.add_argument("--predictions", default=None, help="also save the frame with predictions (JSONL)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--note", default="", help="free text for the sidecar (e.g. why n was reduced)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    if args.data:
        df = load_jsonl(args.data)
    else:
        df = generate_suite(
            args.tasks,
            n_samples=args.n,
            context_length=args.length,
            tokenizer=tokenizer,
            seed=args.seed,
            qa_data=args.qa_data,
            progress=True,
        )
    start = time.time()
    with torch.inference_mode():
        df["predicted_answer"] = predict(df, model, tokenizer)
    minutes = (time.time() - start) / 60
    table = results_table(df, score(df))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    command = f"{prog} {shlex.join(argv)}"
    out.with_suffix(".md").write_text(_sidecar(table, df, command, minutes, args.note), encoding="utf-8")
    if args.predictions:
        Path(args.predictions).parent.mkdir(parents=True, exist_ok=True)
        df.to_json(args.predictions, orient="records", lines=True, force_ascii=False)
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
