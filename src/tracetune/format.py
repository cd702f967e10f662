"""The trace format: prompts, the completion parser, answers, and the format check.

Every stage reads completions through this module, so training rewards and
evaluation metrics cannot drift apart (the habit nanochat's ``tasks/gsm8k.py``
and maxtext's ``utils_rl.py`` share). A well-formed completion is::

    <reasoning>Step 1: ... Step 2: ... Therefore, ...</reasoning>
    <answer>40 km/h</answer>

>>> parse_completion("<reasoning>Step 1: 2 + 2 = 4</reasoning> <answer>4</answer>").answer
'4'
>>> parse_number("$1,000.50")
1000.5

Every task kind (``KINDS``) keeps this format and its strict check; only what the
``<answer>`` block must state differs: a number (``parse_number``), an option's
letter (``choice_letter``), a short text (compared after ``normalize_text``), or,
for open prompts, anything non-empty.
"""

from __future__ import annotations

import functools
import math
import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# What a row asks for, and so how its answer is read and checked:
#   numeric  a number, equal to the reference within tolerance (GSM8K)
#   choice   the letter of one of the options rendered into the question
#   text     a short answer, equal to the reference after normalize_text (SQuAD's EM)
#   open     no reference: the answer is judged, never checked (rewards.correctness)
KINDS = ("numeric", "choice", "text", "open")

# The recipe's prompt: no instruction, the fine-tuned model learns the format.
PROMPT_TEMPLATE = "Q: {question}\nA:\n"

# For instruction-tuned checkpoints (gemma3-*-it) zero-shot: Gemma's chat turns with
# the format spelled out, since such a model has never seen our tags. Gemma has no
# system role, so the instruction goes into the user turn (Gemma 3 model card).
_REASON = (
    "Reason step by step inside <reasoning></reasoning>, "
    "writing each step as 'Step N: ...' and ending with 'Therefore, ...'. "
)
CHAT_INSTRUCTION = "Solve the math problem. " + _REASON + "Then give only the final number inside <answer></answer>."
CHAT_INSTRUCTIONS = {
    "numeric": CHAT_INSTRUCTION,
    "choice": "Answer the multiple-choice question. " + _REASON + "Then give only the letter of your choice inside <answer></answer>.",
    "text": "Answer the question. " + _REASON + "Then give only the short final answer inside <answer></answer>.",
    "open": "Respond to the request. " + _REASON + "Then give your full response inside <answer></answer>.",
}
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


def build_prompt(question: str, style: str = "plain", kind: str = "numeric") -> str:
    """The prompt for ``question``: the recipe's ``Q: ...\\nA:\\n`` or Gemma chat turns.

    The plain prompt is the same for every kind (the fine-tuned model learns what
    to answer from its data); the chat instruction says what the answer must be.

    >>> build_prompt("What is 2 + 2?")
    'Q: What is 2 + 2?\\nA:\\n'
    """
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
    if style == "plain":
        return PROMPT_TEMPLATE.format(question=question.strip())
    if style == "chat":
        return CHAT_TEMPLATE.format(instruction=CHAT_INSTRUCTIONS[kind], question=question.strip())
    raise ValueError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")


def render_choices(question: str, choices: Sequence[tuple[str, str]]) -> str:
    """A choice row's question with its options, one per line, as every prompt shows them.

    "(A)" rather than "A." so that no option line reads like the recipe's "A:" line.

    >>> render_choices("Which gas do plants take in?", [("A", "Oxygen"), ("B", "Carbon dioxide")])
    'Which gas do plants take in?\\n(A) Oxygen\\n(B) Carbon dioxide'
    """
    return "\n".join([question.strip(), *(f"({letter}) {text.strip()}" for letter, text in choices)])


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


# ------------------------------------------------------------------ other kinds


_ARTICLES = frozenset({"a", "an", "the"})


def normalize_text(text: str) -> str:
    """SQuAD's answer normalisation (Rajpurkar et al., 2016, the official evaluation
    script's ``normalize_answer``): lowercase, delete punctuation, drop the articles
    a/an/the, collapse whitespace. Punctuation is ASCII's (``string.punctuation``,
    as SQuAD's) and Unicode's (curly quotes, dashes), which models write too.

    >>> normalize_text("  The Eiffel Tower! "), normalize_text("U.S.A."), normalize_text("“well-known”")
    ('eiffel tower', 'usa', 'wellknown')
    """
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCTUATION and not unicodedata.category(ch).startswith("P"))
    return " ".join(word for word in text.split() if word not in _ARTICLES)


_ASCII_PUNCTUATION = frozenset(string.punctuation)
# "The answer is", "Answer:", "Option", "The correct choice is", ... before a letter.
_CHOICE_CUE = re.compile(
    r"(?:the\s+)?(?:(?:final|correct|right|best)\s+)?(?:answer|option|choice|letter)(?:\s+is)?\s*[:=\-]?\s*", re.IGNORECASE
)
# A letter at the start: "B", "(B)", "[B]", "B)", "B.", "B:", "b)"; a lowercase one
# only with its bracket or stop (a bare "a" is an article).
_LEADING_LETTER = re.compile(r"[(\[](?P<bracketed>[A-Za-z])[)\]]|(?P<marked>[A-Za-z])[).:](?![A-Za-z0-9])|(?P<bare>[A-Z])(?![A-Za-z0-9'\u2019])")
# A letter named anywhere: bracketed, "b)", or a capital standing alone.
_MENTION = re.compile(r"(?<![A-Za-z0-9'\u2019])(?:[(\[]([A-Za-z])[)\]]|([A-Za-z])\)|([A-Z])(?![A-Za-z0-9'\u2019]))")
_DECORATION = "*_`\"'\u201c\u201d \t\n"  # markdown emphasis and quotes around an answer


def _mentions(text: str, letters: Mapping[str, str]) -> set[str]:
    """The option letters ``text`` names (see _MENTION), uppercased."""
    found = {next(g for g in m.groups() if g).upper() for m in _MENTION.finditer(text)}
    return found & set(letters)


def choice_letter(answer: str | None, choices: Mapping[str, str]) -> str | None:
    """The one option an answer names, or None when it names none or more than one.

    Read in this order: the answer is an option's text ("carbon dioxide"); the
    answer starts with a letter, after a cue ("The answer is", "Option") and in any
    usual spelling ("B", "(B)", "b)", "B. carbon dioxide"), and the rest names no
    other letter; or the answer names exactly one letter anywhere ("I think it is
    (B)"). "A or B", "A, B" and "B, not A" name two: None. A letter that is not
    among ``choices`` is none.

    >>> options = {"A": "Oxygen", "B": "Carbon dioxide"}
    >>> [choice_letter(a, options) for a in ("B", "(b)", "Option B", "carbon dioxide", "A or B", "E")]
    ['B', 'B', 'B', 'B', None, None]
    """
    if answer is None:
        return None
    text = answer.strip(_DECORATION)
    if not text:
        return None
    normal = normalize_text(text)
    by_text = [letter for letter, option in choices.items() if normal and normalize_text(option) == normal]
    if len(by_text) == 1:
        return by_text[0]
    for _ in range(3):  # "Answer: option (B)" has two cues
        cue = _CHOICE_CUE.match(text)
        if cue is None or not cue.end():
            break
        text = text[cue.end() :]
    if (lead := _LEADING_LETTER.match(text)) is not None:
        letter, rest = next(g for g in lead.groups() if g).upper(), text[lead.end() :]
    else:
        letter, rest = (text.upper(), "") if len(text) == 1 else ("", text)  # a lone "b" is a letter too
    if letter in choices:  # not "I think it is (B)": "I" is no option, so read on below
        # The chosen option's own text may hold a capital ("Vitamin C"): not a second letter.
        if option := choices[letter].strip():
            rest = re.sub(re.escape(option), " ", rest, flags=re.IGNORECASE)
        return letter if _mentions(rest, choices) <= {letter} else None
    named = _mentions(text, choices)
    return named.pop() if len(named) == 1 else None


def read_answer(answer: str | None, kind: str = "numeric",
                choices: Mapping[str, str] | Sequence[tuple[str, str]] | None = None) -> float | str | None:
    """What an ``<answer>`` block states, read as its kind reads it, or None when it
    states nothing readable: the number (numeric), the option's letter (choice),
    the normalised text (text), the stripped text (open).

    >>> read_answer("40 km/h"), read_answer("(B)", "choice", {"A": "x", "B": "y"}), read_answer(" The Nile. ", "text")
    (40.0, 'B', 'nile')
    """
    if kind == "numeric":
        return parse_number(answer)
    if answer is None:
        return None
    if kind == "choice":
        return choice_letter(answer, dict(choices or {}))
    if kind == "text":
        return normalize_text(answer) or None
    if kind == "open":
        return answer.strip() or None
    raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
