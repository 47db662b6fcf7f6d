"""Count a sample's tokens the way kvpress feeds it to the model, and size its haystack to a target.

A sample's length is ``prompt + answer + max_new_tokens`` tokens (RULER sizes haystacks with
the answer included). The prompt is counted exactly as ``KVPressTextGenerationPipeline.preprocess``
builds it: with a chat template, the context is the user message and the question part is
``question + end-of-turn/assistant header + answer_prefix``; without one, ``bos + context`` and
``question + "\\n" + answer_prefix``. The two parts are tokenized separately, as the pipeline does.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from mergepress.ruler.builders import Prompt


class ContextTooShort(ValueError):
    """Even the smallest haystack exceeds the target; ``minimum`` is what that sample needs."""

    def __init__(self, minimum: int):
        super().__init__(f"needs at least {minimum} tokens")
        self.minimum = minimum


class PromptCounter:
    """Token counts of samples in one tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    def pipeline_texts(self, prompt: Prompt) -> tuple[str, str]:
        """The two texts the kvpress pipeline tokenizes: templated context, and question part."""
        tok = self.tokenizer
        question = prompt.question
        if tok.chat_template is None:
            bos = getattr(tok, "bos_token", None) or ""
            return bos + prompt.context, question + "\n" + prompt.answer_prefix
        # Same separator trick as the pipeline, so that templates that touch the message text
        # (stripping, escaping) are counted exactly as they will run.
        separator = "#" * (len(prompt.context) + 10)
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt.context + separator}],
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=False,
        )
        context, suffix = text.split(separator)
        return context, question + suffix + prompt.answer_prefix

    def n_tokens(self, text: str) -> int:
        """Tokens of ``text`` without special tokens added (the pipeline adds none)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def fixed_tokens(self, prompt: Prompt, max_new_tokens: int) -> int:
        """Tokens that do not depend on the haystack: question part, answer and generation budget."""
        answer = self.n_tokens(" " + " ".join(prompt.answer))
        return self.n_tokens(self.pipeline_texts(prompt)[1]) + answer + max_new_tokens

    def context_tokens(self, prompt: Prompt) -> int:
        """Tokens of the templated context."""
        return self.n_tokens(self.pipeline_texts(prompt)[0])


def fit_units(measure: Callable[[int], int], target: int, lo: int, hi: int, hint: int | None = None) -> tuple[int, int]:
    """Largest ``n`` in ``[lo, hi]`` with ``measure(n) <= target``, found with few calls to ``measure``.

    ``measure`` (tokens of the sample with ``n`` units) is close to linear and non-decreasing, so
    a secant step from the known points usually lands within a unit or two of the answer;
    bisection takes over when a step does not halve the bracket. ``hint`` (the previous
    sample's answer) is the first probe. Returns ``(n, measure(n))``; raises ContextTooShort
    when ``measure(lo) > target``.
    """
    f_lo = measure(lo)
    if f_lo > target:
        raise ContextTooShort(f_lo)
    a, fa = lo, f_lo  # largest n known to fit
    b, fb = None, 0  # smallest n known not to fit
    x = hint if hint is not None else lo + 16
    width = hi - lo + 1
    while True:
        upper = hi if b is None else b - 1
        if upper <= a:
            return a, fa
        x = min(max(x, a + 1), upper)
        fx = measure(x)
        if fx <= target:
            a, fa = x, fx
        else:
            b, fb = x, fx
        upper = hi if b is None else b - 1
        if upper <= a:
            return a, fa
        if b is None:
            # Overshoot the estimate by one unit so that the boundary gets bracketed next step.
            slope = max((fa - f_lo) / (a - lo), 1e-3)
            x = a + int((target - fa) / slope) + 1
        elif b - a > width / 2:
            x = (a + b) // 2
        else:
            x = a + int((target - fa) * (b - a) / max(fb - fa, 1))
        width = b - a if b is not None else width
