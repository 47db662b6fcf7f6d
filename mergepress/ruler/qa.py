"""Read the SQuAD v2 and HotpotQA dev files that the qa tasks draw questions and documents from.

Neither dataset is reachable offline, so the user passes a folder holding the public files;
without it the qa tasks are reported as not run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

QA_FILES = {
    "squad": (
        "dev-v2.0.json",
        "SQuAD v2.0 dev JSON (https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json): "
        '{"version": ..., "data": [{"title": ..., "paragraphs": [{"context": ..., "qas": '
        '[{"id": ..., "question": ..., "answers": [{"text": ..., "answer_start": ...}], '
        '"is_impossible": ...}]}]}]}',
    ),
    "hotpotqa": (
        "hotpot_dev_distractor_v1.json",
        "HotpotQA dev distractor JSON "
        "(http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json): "
        '[{"_id": ..., "question": ..., "answer": ..., "supporting_facts": [[title, sent_id], ...], '
        '"context": [[title, [sentence, ...]], ...]}]',
    ),
}


@dataclass(frozen=True)
class QAItem:
    """One answerable question: its references and the documents it relates to (indices into ``docs``)."""

    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]  # documents that contain the answer: always in the context
    related: tuple[int, ...]  # same article / same distractor set: preferred distractors


@dataclass(frozen=True)
class QASource:
    """A de-duplicated document pool and the questions over it."""

    docs: tuple[str, ...]
    items: tuple[QAItem, ...]
    doc_words: tuple[int, ...]  # whitespace-separated words per document: the qa haystack unit


def qa_file(qa_data: str | Path, dataset: str) -> Path:
    """Path of ``dataset``'s file inside ``qa_data``; FileNotFoundError naming the file and its format."""
    name, fmt = QA_FILES[dataset]
    folder = Path(qa_data)
    if not folder.is_dir():
        raise FileNotFoundError(f"qa_data folder {folder} does not exist; it must hold {name}: {fmt}")
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; qa_data must hold {name}: {fmt}")
    return path


def load_qa(qa_data: str | Path, dataset: str) -> QASource:
    """Read ``dataset`` (``"squad"`` or ``"hotpotqa"``) from the folder ``qa_data``."""
    path = qa_file(qa_data, dataset)
    return _load_cached(str(path.resolve()), path.stat().st_mtime_ns, dataset)


@lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int, dataset: str) -> QASource:
    # mtime_ns is part of the cache key only, so that an edited file is read again.
    name, fmt = QA_FILES[dataset]
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        source = _parse_squad(data) if dataset == "squad" else _parse_hotpotqa(data)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not in the expected format ({err!r}); expected {name}: {fmt}") from err
    if not source.items:
        raise ValueError(f"{path} holds no answerable question; expected {name}: {fmt}")
    return source


def _source(docs: tuple[str, ...], items: list[QAItem]) -> QASource:
    return QASource(docs, tuple(items), tuple(len(re.findall(r"\S+", d)) for d in docs))


def _index_docs(texts: list[str]) -> tuple[tuple[str, ...], dict[str, int]]:
    # Sorted so that document indices, hence sampled distractors, do not depend on file order.
    docs = tuple(sorted(set(texts)))
    return docs, {d: i for i, d in enumerate(docs)}


def _parse_squad(data: dict) -> QASource:
    articles = data["data"]
    docs, index = _index_docs([p["context"] for a in articles for p in a["paragraphs"]])
    items = []
    for article in articles:
        article_docs = [index[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            gold = index[paragraph["context"]]
            for qa in paragraph["qas"]:
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                if qa.get("is_impossible", False) or not answers:
                    continue
                related = tuple(d for d in dict.fromkeys(article_docs) if d != gold)
                items.append(QAItem(qa["question"], answers, (gold,), related))
    return _source(docs, items)


def _parse_hotpotqa(data: list) -> QASource:
    def text(title: str, sentences: list[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    docs, index = _index_docs([text(t, s) for item in data for t, s in item["context"]])
    items = []
    for item in data:
        supporting = {title for title, _ in item["supporting_facts"]}
        ids = list(dict.fromkeys(index[text(t, s)] for t, s in item["context"]))
        titles = {index[text(t, s)]: t for t, s in item["context"]}
        gold = tuple(i for i in ids if titles[i] in supporting)
        related = tuple(i for i in ids if titles[i] not in supporting)
        if not gold:  # malformed entry: the answer would not be recoverable from the context
            continue
        items.append(QAItem(item["question"], (str(item["answer"]),), gold, related))
    return _source(docs, items)
