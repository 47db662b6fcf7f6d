"""Run a grid of press configurations over a RULER suite: one prefill per sample, resumable."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from kvpress import KVPressTextGenerationPipeline
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergepress.ruler.scoring import clean_prediction, string_match_all, string_match_part
from mergepress.sweep.engine import achieved_ratio, answer_and_nll, apply_press, capture_prefill, check_model, timed
from mergepress.sweep.engine import tokenize as tokenize_sample
from mergepress.sweep.registry import build_press
from mergepress.sweep.store import ResultStore, merge_parts, read_results, row_key


@dataclass(frozen=True)
class Config:
    """One cell of the grid: a registry name, its ratio (or DMS threshold) and merge parameters."""

    name: str
    value: float = 0.0
    params: dict = field(default_factory=dict)

    @property
    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True) if self.params else ""

    def __hash__(self) -> int:
        return hash((self.name, self.value, self.params_json))


def reference_text(answers: list[str], answer_prefix: str) -> str:
    """The reference as the task's answer format lists it: comma-separated, after the prefix."""
    joined = ", ".join(str(a) for a in answers)
    return joined if answer_prefix.endswith((" ", "\n")) else " " + joined


def sample_score(task: str, prediction: str, answers: list[str]) -> float:
    """kvpress's RULER metric for one sample (0-100)."""
    metric = string_match_part if task.startswith("qa") else string_match_all
    return metric([clean_prediction(prediction)], [[str(a) for a in answers]])


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(err).lower()


def run_sweep(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suite: pd.DataFrame,
    configs: list[Config],
    out: str | Path,
    settings: dict,
    max_new_tokens: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
    progress: bool = True,
    max_seconds: float | None = None,
) -> Path:
    """Evaluate every configuration on every sample of ``suite``; append rows to ``out``.

    Samples are visited round-robin over tasks; pairs already in ``out`` are skipped. With
    ``world_size > 1`` this process takes every ``world_size``-th sample and writes a part file;
    after ``barrier()`` the main process folds the parts into ``out``, in the order one process
    would have written them. ``settings`` (model, suite, generation options) guard ``out`` against
    rows from another experiment. ``max_new_tokens`` overrides the suite's per-task budgets.
    ``max_seconds`` stops taking new samples once that much time has passed (0: only fold in the
    part files of a killed sharded run); the run then ends as usual, and a rerun resumes it.
    """
    start = time.monotonic()
    check_model(model)
    out = Path(out)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    # Round-robin over tasks (sample 0 of every task, then sample 1, ...): a sweep stopped early
    # still covers every task with about the same number of samples.
    ordered = suite.iloc[suite.groupby("task", sort=False).cumcount().to_numpy().argsort(kind="stable")]
    order = [_key(s, c) for s in ordered.itertuples() for c in configs]  # the order one process writes
    if rank == 0:
        ResultStore(out, settings)  # validates settings, creates the file and its sidecar
        if world_size == 1:  # rows of a killed sharded run count as done: fold them in first
            leftovers = sorted(out.parent.glob(f"{out.stem}.part*-of-*.csv"))
            for p in leftovers:
                ResultStore(p, settings, write_settings=False)  # cuts a partial last line
            if leftovers:
                merge_parts(out, leftovers, order)
    if barrier is not None:
        barrier()
    part = out if world_size == 1 else out.with_name(f"{out.stem}.part{rank}-of-{world_size}.csv")
    store = ResultStore(part, settings, write_settings=False)
    done = store.done | ResultStore(out, settings, write_settings=False).done if part != out else store.done
    samples = ordered.iloc[rank::world_size]
    todo = [(s, [c for c in configs if _key(s, c) not in done]) for s in samples.itertuples()]
    todo = [(s, pending) for s, pending in todo if pending]

    total = sum(len(pending) for _, pending in todo)
    bar = tqdm(total=total, desc=f"sweep{'' if world_size == 1 else f' [{rank}]'}", disable=not progress)
    for sample, pending in todo:
        if max_seconds is not None and time.monotonic() - start >= max_seconds:
            bar.write(f"time budget of {max_seconds / 60:.1f} min spent: stopping; rerun to resume")
            break
        budget = max_new_tokens or int(sample.max_new_tokens)
        answers = list(sample.answer)
        try:
            prompt = tokenize_sample(
                pipe,
                sample.context,
                sample.question,
                sample.answer_prefix,
                reference_text(answers, sample.answer_prefix),
            )
            captured, prefill_s = timed(capture_prefill, model, prompt.context_ids)
        except Exception as err:  # noqa: BLE001 - only memory errors are recorded, others re-raised
            if not _is_oom(err):
                raise
            for config in pending:
                store.append(_failed(sample, config, err))
                bar.update()
            continue
        for config in pending:
            row = _base_row(sample, config)
            try:
                press = build_press(config.name, config.value, config.params)
                cache, press_s = timed(apply_press, model, press, captured)
                ratio = achieved_ratio(model, cache, prompt.context_ids.shape[1])
                (answer, nll), decode_s = timed(answer_and_nll, pipe, press, cache, prompt, budget)
            except Exception as err:  # noqa: BLE001
                if not _is_oom(err):
                    raise
                store.append(_failed(sample, config, err))
                bar.update()
                continue
            row.update(
                status="ok",
                compression_ratio=round(ratio, 6),
                predicted_answer=answer,
                score=sample_score(sample.task, answer, answers),
                answer_nll=round(nll, 6),
                context_tokens=prompt.context_ids.shape[1],
                prefill_s=round(prefill_s, 4),
                press_s=round(press_s, 4),
                decode_s=round(decode_s, 4),
            )
            store.append(row)
            bar.update()
        del captured
    bar.close()

    if world_size > 1:
        if barrier is not None:
            barrier()
        if rank == 0:
            parts = [out.with_name(f"{out.stem}.part{r}-of-{world_size}.csv") for r in range(world_size)]
            merge_parts(out, [p for p in parts if p.exists()], order)
    return out


def _key(sample, config: Config) -> tuple:
    return row_key(_base_row(sample, config))


def _base_row(sample, config: Config) -> dict:
    return {
        "task": sample.task,
        "index": int(sample.index),
        "config": config.name,
        "value": float(config.value),
        "params": config.params_json,
    }


def _failed(sample, config: Config, err: BaseException) -> dict:
    reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    return {**_base_row(sample, config), "status": f"failed: {reason}"}


def summarize(out: str | Path) -> pd.DataFrame:
    """Mean score per task and overall, and mean answer NLL and achieved ratio, per configuration."""
    df = read_results(out)
    ok = df[df["status"] == "ok"]
    keys = ["config", "value", "params"]
    ok = ok.assign(params=ok["params"].fillna(""))
    table = ok.pivot_table(index=keys, columns="task", values="score", aggfunc="mean")
    table["mean"] = table.mean(axis=1)
    extra = ok.groupby(keys).agg(
        answer_nll=("answer_nll", "mean"), ratio=("compression_ratio", "mean"), n=("score", "size")
    )
    return table.join(extra).round(3).reset_index()
