"""Score model predictions like kvpress's ``evaluation/benchmarks/ruler/calculate_metrics.py``."""

from __future__ import annotations

import re

import pandas as pd

from mergepress.ruler.tasks import ALL_TASKS, NOT_RUN, QA_TASKS

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean_prediction(prediction: object) -> str:
    """Strip, drop control characters, strip again (as kvpress does); a missing prediction is ``""``."""
    if prediction is None or (isinstance(prediction, float) and pd.isna(prediction)):
        return ""  # e.g. an empty generation read back from CSV
    return _CONTROL.sub("", str(prediction).strip()).strip()


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    """100 x mean over samples of the fraction of references found (case-insensitive) in the prediction."""
    pairs = zip(predictions, references, strict=True)
    hits = [sum(r.lower() in p.lower() for r in refs) / len(refs) for p, refs in pairs]
    return round(100 * sum(hits) / len(hits), 2)


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    """100 x mean over samples of whether any reference is found (case-insensitive) in the prediction."""
    pairs = zip(predictions, references, strict=True)
    hits = [max(float(r.lower() in p.lower()) for r in refs) for p, refs in pairs]
    return round(100 * sum(hits) / len(hits), 2)


def score(df: pd.DataFrame) -> dict[str, float | str]:
    """Per-task RULER scores (0-100) and their unweighted ``mean``.

    ``df`` needs ``task``, ``answer`` (list of references) and ``predicted_answer``. qa tasks
    use ``string_match_part``, the others ``string_match_all``. qa tasks absent from ``df``
    are reported as ``"not run (needs qa_data)"`` and left out of the mean. ``df`` is not
    modified (kvpress's version overwrites ``predicted_answer``).
    """
    missing = {"task", "answer", "predicted_answer"} - set(df.columns)
    if missing:
        raise ValueError(f"score() needs the columns {sorted(missing)}")
    if df.empty:
        raise ValueError("score() got an empty DataFrame")
    present = list(dict.fromkeys(df["task"]))
    # Known tasks in benchmark order, then any other task names in order of appearance.
    order = [t for t in ALL_TASKS if t in present] + [t for t in present if t not in ALL_TASKS]
    scores: dict[str, float | str] = {}
    for task in order:
        rows = df[df["task"] == task]
        predictions = [clean_prediction(p) for p in rows["predicted_answer"]]
        references = [[str(r) for r in refs] for refs in rows["answer"]]
        if not all(references):
            raise ValueError(f"task {task} has a sample with no reference answer")
        metric = string_match_part if task.split("_")[0] == "qa" else string_match_all
        scores[task] = metric(predictions, references)
    for task in QA_TASKS:
        scores.setdefault(task, NOT_RUN)
    numbers = [v for v in scores.values() if isinstance(v, float)]
    scores["mean"] = round(sum(numbers) / len(numbers), 2)
    return scores
