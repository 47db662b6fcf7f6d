"""The 13 RULER tasks: their parameters, generation budgets and prompt templates.

Everything here follows RULER's ``synthetic.yaml`` and ``constants.py`` (see
``/work/shared/specs/ruler.md``). Each prompt is split the way kvpress splits RULER samples:
``context`` (compressed by a press), then ``question`` and ``answer_prefix`` (not compressed).
"""

from __future__ import annotations

from dataclasses import dataclass

# Generation budget per family (RULER ``tokens_to_generate``).
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}

NOT_RUN = "not run (needs qa_data)"


@dataclass(frozen=True)
class TaskSpec:
    """One task. Fields after ``family`` only matter to the family named in their comment."""

    name: str
    family: str  # niah | vt | cwe | fwe | qa
    haystack: str = ""  # niah: repeat (noise sentences) | essay | needle (distractor needles)
    key_type: str = "words"  # niah: words | numbers | uuids
    value_type: str = "numbers"  # niah
    num_keys: int = 1  # niah: needles with different keys
    num_values: int = 1  # niah: values per key
    num_queries: int = 1  # niah: keys asked about (RULER raises num_keys to at least this)
    dataset: str = ""  # qa: squad | hotpotqa

    @property
    def max_new_tokens(self) -> int:
        """Tokens the model may generate for this task."""
        return MAX_NEW_TOKENS[self.family]


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("niah_single_1", "niah", haystack="repeat"),
        TaskSpec("niah_single_2", "niah", haystack="essay"),
        TaskSpec("niah_single_3", "niah", haystack="essay", value_type="uuids"),
        TaskSpec("niah_multikey_1", "niah", haystack="essay", num_keys=4),
        TaskSpec("niah_multikey_2", "niah", haystack="needle"),
        TaskSpec("niah_multikey_3", "niah", haystack="needle", key_type="uuids", value_type="uuids"),
        TaskSpec("niah_multivalue", "niah", haystack="essay", num_values=4),
        TaskSpec("niah_multiquery", "niah", haystack="essay", num_keys=4, num_queries=4),
        TaskSpec("vt", "vt"),
        TaskSpec("cwe", "cwe"),
        TaskSpec("fwe", "fwe"),
        TaskSpec("qa_1", "qa", dataset="squad"),
        TaskSpec("qa_2", "qa", dataset="hotpotqa"),
    )
}
ALL_TASKS: tuple[str, ...] = tuple(TASKS)
QA_TASKS: tuple[str, ...] = tuple(t for t in ALL_TASKS if TASKS[t].family == "qa")
OFFLINE_TASKS: tuple[str, ...] = tuple(t for t in ALL_TASKS if t not in QA_TASKS)


def get_task(name: str) -> TaskSpec:
    """The spec of task ``name``; ValueError listing the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown RULER task {name!r}; tasks: {', '.join(ALL_TASKS)}")
    return TASKS[name]


# --- templates -------------------------------------------------------------------------------
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."

# niah: plural forms, and the singular forms RULER uses when one value is asked for.
NIAH_CONTEXT = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
)
NIAH_QUESTION = "What are all the special magic {type_v} for {query} mentioned in the provided text?"
NIAH_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
NIAH_CONTEXT_ONE = (
    "A special magic {type_v} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
)
NIAH_QUESTION_ONE = "What is the special magic {type_v} for {query} mentioned in the provided text?"
NIAH_PREFIX_ONE = " The special magic {type_v} for {query} mentioned in the provided text is"

VT_CONTEXT = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
# "assgined" is RULER's typo, kept so that prompts match the benchmark.
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assgined the value {value}, they are: "
)

CWE_CONTEXT = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

FWE_CONTEXT = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. {context}\n"
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
QA_CONTEXT = QA_INSTRUCTION + "\n\nThe following are given documents.\n\n{context}\n\n"
QA_QUESTION = QA_INSTRUCTION + "\n\nQuestion: {query}"
QA_PREFIX = " Answer:"
QA_DOCUMENT = "Document {i}:\n{document}"
