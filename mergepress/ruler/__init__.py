"""Offline RULER for kvpress: generate the 13 synthetic tasks at any length, save them, score predictions.

>>> from mergepress.ruler import generate_suite, score
>>> df = generate_suite(n_samples=20, context_length=4096, tokenizer=tok)  # qa needs qa_data=DIR
>>> df["predicted_answer"] = ...  # e.g. kvpress's pipeline on context / question / answer_prefix
>>> score(df)  # {"niah_single_1": 100.0, ..., "qa_1": "not run (needs qa_data)", "mean": ...}
"""

from mergepress.ruler.generator import GENERATOR_VERSION, generate, generate_suite
from mergepress.ruler.jsonl import load_jsonl, save_jsonl
from mergepress.ruler.scoring import score
from mergepress.ruler.tasks import ALL_TASKS, NOT_RUN, OFFLINE_TASKS, QA_TASKS, TASKS

__all__ = [
    "ALL_TASKS",
    "GENERATOR_VERSION",
    "NOT_RUN",
    "OFFLINE_TASKS",
    "QA_TASKS",
    "TASKS",
    "generate",
    "generate_suite",
    "load_jsonl",
    "save_jsonl",
    "score",
]
