"""Build one sample of a task at any haystack size.

Each builder draws everything random about a sample once, from the ``random.Random`` it is
given (needles, depths, chain, word choices), then ``render(n)`` lays the sample out with
``n`` haystack units (essay words, noise lines, distractor needles, list words, ...). The
length fitter calls ``render`` for a few values of ``n``; since nothing random is drawn in
``render``, the sample only grows or shrinks with ``n`` and stays a deterministic function of
the seed.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from dataclasses import dataclass
from math import pi
from typing import Protocol

from mergepress.ruler import sources
from mergepress.ruler.qa import QAItem, QASource
from mergepress.ruler.tasks import (
    CWE_CONTEXT,
    CWE_PREFIX,
    CWE_QUESTION,
    FWE_CONTEXT,
    FWE_PREFIX,
    FWE_QUESTION,
    NEEDLE,
    NIAH_CONTEXT,
    NIAH_CONTEXT_ONE,
    NIAH_PREFIX,
    NIAH_PREFIX_ONE,
    NIAH_QUESTION,
    NIAH_QUESTION_ONE,
    NOISE,
    QA_CONTEXT,
    QA_DOCUMENT,
    QA_PREFIX,
    QA_QUESTION,
    VT_CONTEXT,
    VT_PREFIX,
    VT_QUESTION,
    TaskSpec,
)

# The 40 needle depths (percent of the essay's sentences) RULER draws from.
DEPTHS: tuple[int, ...] = tuple(round(100 * i / 39) for i in range(40))


@dataclass(frozen=True)
class Prompt:
    """One sample, split as kvpress feeds it to the model."""

    context: str
    question: str
    answer_prefix: str
    answer: list[str]


class SampleBuilder(Protocol):
    """What the length fitter needs from a sample: its range of haystack units and a renderer."""

    @property
    def min_units(self) -> int:
        """Fewest haystack units the task allows."""
        ...

    @property
    def max_units(self) -> int:
        """Most haystack units the source can provide."""
        ...

    def render(self, n: int) -> Prompt:
        """The sample with ``n`` haystack units."""
        ...


def _insert_at_fractions(lines: list[str], items: list[str], fractions: list[float]) -> list[str]:
    """Insert ``items`` into ``lines`` at fractional positions, keeping the items' order."""
    out = list(lines)
    # Sorted positions plus an offset of j keep item j after item j-1 even when positions tie.
    for j, pos in enumerate(sorted(int(f * (len(lines) + 1)) for f in fractions)):
        out.insert(pos + j, items[j])
    return out


def _random_item(rng: random.Random, kind: str) -> str:
    """A needle key or value: ``adjective-noun`` words, a 7-digit number or a uuid4 string."""
    if kind == "words":
        return f"{rng.choice(sources.word_list('adjective'))}-{rng.choice(sources.word_list('noun'))}"
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle item type {kind!r}; expected words, numbers or uuids")


def _fresh_item(rng: random.Random, kind: str, taken: set[str], text: str = "") -> str:
    """A random item not in ``taken`` and not occurring in ``text``, so that it occurs once per sample."""
    while True:
        item = _random_item(rng, kind)
        if item not in taken and item not in text:
            taken.add(item)
            return item


class NiahSample:
    """Needle in a haystack: needles ``One of the special magic ... for KEY is: VALUE.`` in a haystack."""

    min_units = 1

    def __init__(self, spec: TaskSpec, rng: random.Random):
        self.spec = spec
        num_keys = max(spec.num_keys, spec.num_queries)
        # Keys and values must not occur in the essays, or a needle would not be the only match.
        corpus = sources.essay_text() if spec.haystack == "essay" else ""
        taken: set[str] = set()
        keys = [_fresh_item(rng, spec.key_type, taken, corpus) for _ in range(num_keys)]
        values = {k: [_fresh_item(rng, spec.value_type, taken, corpus) for _ in range(spec.num_values)] for k in keys}
        self.needles = [NEEDLE.format(type_v=spec.value_type, key=k, value=v) for k in keys for v in values[k]]
        rng.shuffle(self.needles)
        if spec.haystack == "essay":
            self.depths = sorted(rng.sample(DEPTHS, len(self.needles)))
        else:
            self.fractions = [rng.random() for _ in self.needles]
        queried = [keys[i] for i in rng.sample(range(num_keys), spec.num_queries)]
        self.answer = [v for k in queried for v in values[k]]
        query = ", ".join(queried[:-1]) + ", and " + queried[-1] if len(queried) > 1 else queried[0]
        one = len(self.answer) == 1
        type_v = spec.value_type[:-1] if one else spec.value_type  # "numbers" -> "number"
        self._context = (NIAH_CONTEXT_ONE if one else NIAH_CONTEXT).replace("{type_v}", type_v)
        self.question = (NIAH_QUESTION_ONE if one else NIAH_QUESTION).format(type_v=type_v, query=query)
        self.answer_prefix = (NIAH_PREFIX_ONE if one else NIAH_PREFIX).format(type_v=type_v, query=query)
        # Distractor needles (haystack "needle") are drawn lazily from their own stream, so the
        # first n are the same whatever n the fitter asks for.
        self._taken = taken
        self._distractor_rng = random.Random(rng.getrandbits(64))
        self._distractors: list[str] = []

    @property
    def max_units(self) -> int:
        """Most haystack units available (essay words; noise lines and distractors are unbounded)."""
        return len(sources.essay_words()) if self.spec.haystack == "essay" else 10**7

    def _distractor_lines(self, n: int) -> list[str]:
        spec = self.spec
        while len(self._distractors) < n:
            # Never the real keys or values (a copy of taken: distractors may repeat each other).
            taken = set(self._taken)
            key = _fresh_item(self._distractor_rng, spec.key_type, taken)
            value = _fresh_item(self._distractor_rng, spec.value_type, taken)
            self._distractors.append(NEEDLE.format(type_v=spec.value_type, key=key, value=value))
        return self._distractors[:n]

    def _essay(self, n: int) -> str:
        sentences = sources.split_sentences(" ".join(sources.essay_words()[:n]))
        cuts = [0] + [int(len(sentences) * d / 100) for d in self.depths] + [len(sentences)]
        parts: list[str] = []
        for i, needle in enumerate(self.needles):
            parts += sentences[cuts[i] : cuts[i + 1]] + [needle]
        parts += sentences[cuts[-2] :]
        return " ".join(parts)

    def render(self, n: int) -> Prompt:
        """The sample with ``n`` haystack units."""
        if self.spec.haystack == "essay":
            text = self._essay(n)
        else:
            lines = [NOISE] * n if self.spec.haystack == "repeat" else self._distractor_lines(n)
            text = "\n".join(_insert_at_fractions(lines, self.needles, self.fractions))
        context = self._context.format(context=text)
        return Prompt(context, self.question, self.answer_prefix, list(self.answer))


class VtSample:
    """Variable tracking: one chain ``VAR A = 12345``, ``VAR B = VAR A``, ... hidden in noise lines."""

    num_hops = 4
    min_units = 1
    max_units = 10**7

    def __init__(self, spec: TaskSpec, rng: random.Random):
        names: list[str] = []
        while len(names) < self.num_hops + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names:
                names.append(name)
        value = str(rng.randint(10000, 99999))
        hops = [f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(self.num_hops)]
        self.chain = [f"VAR {names[0]} = {value}"] + hops
        self.fractions = [rng.random() for _ in self.chain]
        self.answer = names
        self.question = VT_QUESTION.format(value=value)
        self.answer_prefix = VT_PREFIX.format(num_v=len(names), value=value)

    def render(self, n: int) -> Prompt:
        """The sample with ``n`` noise lines."""
        text = "\n".join(_insert_at_fractions([NOISE] * n, self.chain, self.fractions))
        return Prompt(VT_CONTEXT.format(context=text), self.question, self.answer_prefix, list(self.answer))


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


class CweSample:
    """Common words: a numbered word list where 10 words repeat more often, after a one-shot example.

    Below 4096 tokens the 10 common words appear 6 times and the others once (example: 3 and
    1); from 4096 on they appear 30 times and the others 3 times (example: 10 and 3).
    """

    num_common = 10
    min_units = 0

    def __init__(self, spec: TaskSpec, rng: random.Random, target: int):
        small = target < 4096
        self.repeats, self.other_repeats = (6, 1) if small else (30, 3)
        ex_words, ex_repeats, ex_other = (20, 3, 1) if small else (40, 10, 3)
        pool = sorted({w for kind in ("noun", "adjective", "verb") for w in sources.word_list(kind)})
        example = rng.sample(pool, ex_words)
        ex_list = example[: self.num_common] * ex_repeats + example[self.num_common :] * ex_other
        rng.shuffle(ex_list)
        # The example's words are kept out of the real list, so that they cannot change its counts.
        chosen = set(example)
        self.order = [w for w in rng.sample(pool, len(pool)) if w not in chosen]
        self.answer = self.order[: self.num_common]
        self.max_units = len(self.order) - self.num_common
        self._shuffle_seed = rng.getrandbits(64)
        self._example = (
            CWE_CONTEXT.format(context=_numbered(ex_list))
            + CWE_QUESTION
            + CWE_PREFIX
            + " "
            + _numbered(example[: self.num_common])
            + "\n"
        )

    def render(self, n: int) -> Prompt:
        """The sample with ``n`` uncommon words."""
        others = self.order[self.num_common : self.num_common + n]
        words = self.answer * self.repeats + others * self.other_repeats
        random.Random(self._shuffle_seed).shuffle(words)
        context = self._example + CWE_CONTEXT.format(context=_numbered(words))
        return Prompt(context, CWE_QUESTION, CWE_PREFIX, list(self.answer))


_ZETA_2 = pi**2 / 6  # normaliser of the zipf(alpha=2) word counts


def _fwe_counts(mass: int, vocab_size: int) -> list[int]:
    """Occurrences of the words of rank 1..vocab_size for a zipf(2) text of about ``mass`` words."""
    return [int(mass / (k * k) / _ZETA_2) for k in range(1, vocab_size + 1)]


def _fwe_min_mass() -> int:
    # Smallest mass at which ranks 1..5 have strictly decreasing counts, so the top 3 after
    # the dots (ranks 2-4) are unambiguous.
    mass = 1
    while not all(a > b for a, b in zip(_fwe_counts(mass, 5), _fwe_counts(mass, 5)[1:], strict=False)):
        mass += 1
    return mass


class FweSample:
    """Frequent coded words: zipf-distributed 6-letter coded words; the top one is replaced by '...'."""

    min_units = _fwe_min_mass()

    def __init__(self, spec: TaskSpec, rng: random.Random, target: int):
        vocab_size = max(10, target // 50)  # RULER: max_seq_length // 50
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
        self.vocab = sorted(vocab)
        rng.shuffle(self.vocab)
        self.vocab[0] = "..."  # the most frequent word is noise the question says to ignore
        self.answer = self.vocab[1:4]
        self.max_units = 64 * target  # each unit adds at most ~1 word; never the binding limit
        self._shuffle_seed = rng.getrandbits(64)

    def render(self, n: int) -> Prompt:
        """The sample with a zipf mass of ``n`` words."""
        counts = _fwe_counts(n, len(self.vocab))
        words = [w for w, c in zip(self.vocab, counts, strict=True) for _ in range(c)]
        random.Random(self._shuffle_seed).shuffle(words)
        context = FWE_CONTEXT.format(context=" ".join(words))
        return Prompt(context, FWE_QUESTION, FWE_PREFIX, list(self.answer))


_WORD = re.compile(r"\S+")


class QaSample:
    """Question answering: the gold documents among distractors, all shuffled and numbered.

    Distractors come first from the question's own article (SQuAD) or distractor set
    (HotpotQA), then from random other documents. The unit is one distractor word: the last
    distractor may be cut at a word boundary so the sample can land close to its target.
    """

    min_units = 0

    def __init__(self, spec: TaskSpec, rng: random.Random, source: QASource, item: QAItem):
        self.source = source
        self.item = item
        gold = set(item.gold)
        related = [d for d in item.related if d not in gold]
        rng.shuffle(related)
        excluded = gold | set(related)
        others = [d for d in rng.sample(range(len(source.docs)), len(source.docs)) if d not in excluded]
        self.distractors = related + others
        self.max_units = sum(source.doc_words[d] for d in self.distractors)
        self._shuffle_seed = rng.getrandbits(64)
        self.question = QA_QUESTION.format(query=item.question)

    def render(self, n: int) -> Prompt:
        """The sample with ``n`` distractor words."""
        docs = [self.source.docs[d] for d in self.item.gold]
        left = n
        for d in self.distractors:
            if left <= 0:
                break
            doc = self.source.docs[d]
            if self.source.doc_words[d] > left:
                # Cut after the last word that fits, keeping the document's own spacing.
                doc = doc[: list(_WORD.finditer(doc))[left - 1].end()]
            docs.append(doc)
            left -= self.source.doc_words[d]
        random.Random(self._shuffle_seed).shuffle(docs)
        context = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=doc) for i, doc in enumerate(docs))
        return Prompt(QA_CONTEXT.format(context=context), self.question, QA_PREFIX, list(self.item.answers))
