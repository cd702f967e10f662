"""The trace format: prompts, the completion parser, numbers, and the format check.

Every stage reads completions through this module, so training rewards and
evaluation metrics cannot drift apart (the habit nanochat's ``tasks/gsm8k.py``
and maxtext's ``utils_rl.py`` share). A well-formed completion is::

    <reasoning>Step 1: ... Step 2: ... Therefore, ...</reasoning>
    <answer>40 km/h</answer>

>>> parse_completion("<reasoning>Step 1: 2 + 2 = 4</reasoning> <answer>4</answer>").answer
'4'
>>> parse_number("$1,000.50")
1000.5
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

# The recipe's prompt: no instruction, the fine-tuned model learns the format.
PROMPT_TEMPLATE = "Q: {question}\nA:\n"

# For instruction-tuned checkpoints (gemma3-*-it) zero-shot: Gemma's chat turns with
# the format spelled out, since such a model has never seen our tags. Gemma has no
# system role, so the instruction goes into the user turn (Gemma 3 model card).
CHAT_INSTRUCTION = (
    "Solve the math problem. Reason step by step inside <reasoning></reasoning>, "
    "writing each step as 'Step N: ...' and ending with 'Therefore, ...'. "
    "Then give only the final number inside <answer></answer>."
)
CHAT_TEMPLATE = (
    "<start_of_turn>user\n{instruction}\n\n{question}<end_of_turn>\n<start_of_turn>model\n"
)

PROMPT_STYLES = ("plain", "chat")

REASONING_OPEN, REASONING_CLOSE = "<reasoning>", "</reasoning>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (REASONING_OPEN, REASONING_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# A number as it appears in answers: optional sign, optional currency, thousands
# separators, decimals, and an optional "/ denominator" for simple fractions.
# The sign only counts when it does not follow a digit or word ("10-5" is not -5).
# ASCII digits only: Python's \d also matches other scripts' digits. Whitespace is
# only consumed after a sign or currency symbol, which keeps matching linear on long
# runs of spaces (a bare leading \s* would rescan them from every position).
_NUMBER = re.compile(
    r"""
    (?:(?P<sign>(?<![\w)\]])[-\u2212])\s*)?
    (?:[$\u00a3\u20ac]\s*)?
    (?=\.?[0-9])  # a digit must follow, so the optional parts never match empty
    (?P<int>[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)?
    (?P<frac>\.[0-9]+)?
    (?:\s*/\s*(?P<den>[0-9]+)(?![0-9.,]))?
    """,
    re.VERBOSE,
)


def build_prompt(question: str, style: str = "plain") -> str:
    """The prompt for ``question``: the recipe's ``Q: ...\\nA:\\n`` or Gemma chat turns.

    >>> build_prompt("What is 2 + 2?")
    'Q: What is 2 + 2?\\nA:\\n'
    """
    if style == "plain":
        return PROMPT_TEMPLATE.format(question=question.strip())
    if style == "chat":
        return CHAT_TEMPLATE.format(instruction=CHAT_INSTRUCTION, question=question.strip())
    raise ValueError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")


_STEP_LABEL = re.compile(r"^Step [0-9]+: ")


def numbered_steps(steps: list[str]) -> list[str]:
    """The reasoning's step lines, ``Step N: ...`` from 1 (``step_text`` undoes it).

    >>> numbered_steps(["2 + 2 = 4", "4 * 2 = 8"])
    ['Step 1: 2 + 2 = 4', 'Step 2: 4 * 2 = 8']
    """
    return [f"Step {i}: {step}" for i, step in enumerate(steps, start=1)]


def step_text(line: str) -> str:
    """A step line without its ``Step N: `` label."""
    return _STEP_LABEL.sub("", line, count=1)


def format_completion(steps: list[str], conclusion: str, answer: str) -> str:
    """Write a completion in the trace format (the shape SFT targets take).

    >>> format_completion(["2 + 2 = 4"], "Therefore, the answer is 4.", "4")
    '<reasoning>Step 1: 2 + 2 = 4\\nTherefore, the answer is 4.</reasoning>\\n<answer>4</answer>'
    """
    lines = numbered_steps(steps) + [conclusion]
    return f"{REASONING_OPEN}{chr(10).join(lines)}{REASONING_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


@dataclass(frozen=True)
class ParsedCompletion:
    """What a completion contains.

    ``reasoning`` / ``answer`` are the block contents when the block occurs exactly
    once, properly closed and not nested; otherwise None. ``outside`` is the text
    outside the two blocks (whitespace-only in a well-formed completion).
    ``answer_span`` is the (start, end) character range of the answer content.
    """

    reasoning: str | None
    answer: str | None
    outside: str
    strict: bool
    answer_span: tuple[int, int] | None


def _single_block(text: str, open_tag: str, close_tag: str) -> tuple[int, int] | None:
    """Content span of the only ``open_tag...close_tag`` block, if there is exactly one.

    Two opening tags, two closing tags, an unclosed tag, or another tag of ours
    inside the block (nesting) all make the block ambiguous: None.
    """
    start, end = text.find(open_tag), text.find(close_tag)
    if start < 0 or end < 0 or text.find(open_tag, start + 1) >= 0 or text.find(close_tag, end + 1) >= 0:
        return None
    start += len(open_tag)
    if end < start:
        return None
    content = text[start:end]
    if "<" in content and any(tag in content for tag in TAGS):
        return None
    return start, end


# Cached: one GRPO step parses each completion for several rewards and metrics.
@functools.lru_cache(maxsize=8192)
def parse_completion(text: str) -> ParsedCompletion:
    """Split a completion into reasoning and answer, and check the strict format.

    The strict format is exactly one ``<reasoning>...</reasoning>`` followed by
    exactly one ``<answer>...</answer>``, only whitespace outside, and a non-empty
    answer (an empty answer cannot be checked).
    """
    reasoning_span = _single_block(text, REASONING_OPEN, REASONING_CLOSE)
    answer_span = _single_block(text, ANSWER_OPEN, ANSWER_CLOSE)
    reasoning = text[slice(*reasoning_span)] if reasoning_span else None
    answer = text[slice(*answer_span)] if answer_span else None

    # Everything not inside a recognised block (tags included) counts as outside.
    # Blocks cannot overlap: neither block's content may hold a tag.
    blocks = []
    if reasoning_span:
        blocks.append((reasoning_span[0] - len(REASONING_OPEN), reasoning_span[1] + len(REASONING_CLOSE)))
    if answer_span:
        blocks.append((answer_span[0] - len(ANSWER_OPEN), answer_span[1] + len(ANSWER_CLOSE)))
    pieces, pos = [], 0
    for block_start, block_end in sorted(blocks):
        pieces.append(text[pos:block_start])
        pos = block_end
    pieces.append(text[pos:])
    outside = " ".join(pieces)

    strict = bool(
        reasoning_span
        and answer_span
        and reasoning_span[1] < answer_span[0]
        and not outside.strip()
        and answer.strip()
    )
    return ParsedCompletion(reasoning, answer, outside, strict, answer_span)


def is_well_formed(text: str) -> bool:
    """The strict format check used for the format rate."""
    return parse_completion(text).strict


def _value(match: re.Match[str]) -> float | None:
    integer, frac, den = match.group("int"), match.group("frac"), match.group("den")
    if integer is None and frac is None:
        return None
    value = float((integer or "0").replace(",", "") + (frac or ""))
    if den is not None:
        if int(den) == 0:
            return None
        value /= int(den)
    return -value if match.group("sign") else value


def find_numbers(text: str) -> list[float]:
    """All numbers in ``text``, in order.

    >>> find_numbers("-5 apples cost $1,000.50, i.e. 3/4 of it")
    [-5.0, 1000.5, 0.75]
    """
    return [v for v in map(_value, _NUMBER.finditer(text)) if v is not None]


@functools.lru_cache(maxsize=8192)
def parse_number(text: str | None) -> float | None:
    """The value an answer states: its last number, units and currency ignored.

    The last number, because answers such as ``48 + 24 = 72`` end with the result.
    A mixed number ``1 1/2`` reads as 1.5. None when there is no number.

    >>> parse_number("40 km/h"), parse_number("72."), parse_number("3/4"), parse_number("none")
    (40.0, 72.0, 0.75, None)
    """
    if text is None:
        return None
    matches = [(m, v) for m in _NUMBER.finditer(text) if (v := _value(m)) is not None]
    if not matches:
        return None
    last_match, value = matches[-1]
    # "1 1/2": a whole number directly before a fraction is its integer part.
    if last_match.group("den") and len(matches) > 1 and value >= 0:
        prev_match, prev = matches[-2]
        between = text[prev_match.end() : last_match.start()]
        if prev_match.group("den") is None and prev_match.group("frac") is None and between.strip() == "":
            value = prev + value if prev >= 0 else prev - value
    return value


def numbers_match(predicted: float | None, reference: float | None, rel_tol: float = 1e-6) -> bool:
    """Numeric equality with tolerance (``40.0`` equals ``40``); None never matches."""
    if predicted is None or reference is None:
        return False
    if not (math.isfinite(predicted) and math.isfinite(reference)):
        return False
    return math.isclose(predicted, reference, rel_tol=rel_tol, abs_tol=1e-9)


def answer_number(text: str) -> float | None:
    """The strict answer: the number inside the single ``<answer>`` block, else None."""
    return parse_number(parse_completion(text).answer)


def lenient_number(text: str) -> float | None:
    """The last number anywhere in the text. For reporting only, never for rewards."""
    return parse_number(text)
