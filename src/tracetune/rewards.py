"""Rewards: pure functions shared by GRPO training and evaluation.

The composite reward, declared once::

    R = sum over the registered components k of  w_k * component_k

      component    range     what it pays for                                    w_k
      correctness  {0, 1}    the <answer> states the reference (by task kind)     0.6
      trace        [0, 1]    a structured trace (rubric: trace_breakdown)         0.25
      confidence   [0, 1]    calibration of the answer tokens' probability        0.15
      arithmetic   [0, 1]    true "a op b = c" claims grounded in the problem     0
                             (rubric: arithmetic_breakdown)
      judge        [0, 1]    an LLM judge's rating by the kind's rubric           0
                             (judge.RewardJudge; the ``judge_score`` column)
      sound        {0, 1}    a right answer whose every "expr = value" claim      0
                             holds (``soundness``): right by reasoning, not luck
      progress     [0, 1]    the reference solution's results its true claims    0
                             compute (rubric: ``progress``)

    with (w_k) = RewardWeights(): the seed recipe's 0.6 / 0.25 / 0.15, and 0 for
    arithmetic, judge, sound and progress, which the recipe does not have.

A component may be undefined (None) for a row it cannot judge: correctness and
confidence for an ``open`` row (no reference: it is judged, never checked), and
arithmetic for a non-numeric row whose prompt holds no number (nothing to ground a
claim in). The composite then renormalises over the weighted components the row
has, so every row's R lies on the same scale [0, sum_k w_k]::

    R = (sum_k w_k / sum_{k defined} w_k) * sum_{k defined} w_k * component_k

which is the formula above whenever every component is defined (every numeric row:
its R is bit for bit what it was before task kinds). Renormalising rather than
paying 0 for the missing term keeps an open row's R comparable with a numeric
row's in one batch and in the evaluation's mean; GRPO's advantages, normalised
within a prompt's group (one kind), are unchanged by the rescale. A row whose
weighted components are all undefined has no R: ValueError.

Each reward has a per-sample helper (``correctness``, ``trace_structure``,
``confidence``, ``arithmetic``) and a batch form ``fn(prompts, completions,
**columns) -> list[float]``, the signature Tunix's GRPOLearner and TRL's
GRPOTrainer call. Batch columns: ``reference`` (the reference answer, str or
number; "" for an open row); optionally ``kind`` (each row's task kind,
``format.KINDS``; without it every row is numeric) and ``choices`` (a choice row's
options, letter -> text); for arithmetic ``question`` (the problem's text) and optionally
``solution`` (GSM8K's worked solution, "" when unknown); for confidence
``token_texts`` / ``token_logprobs`` (the completion's tokens as text, which must
concatenate to the completion, and their log-probabilities under the policy) or
``answer_logprobs`` (those of the answer's tokens, already selected). Unknown
columns (Tunix also passes ``mode``, ``trajectory_ids``...) are ignored.

The registry ``REWARDS`` (name -> component) is the one list of components: the
weights (``config.RewardWeights`` and ``--reward-weights``), the composite, the
evaluation's metrics (``scoring``) and GRPO's ``reward/<name>`` metric keys all read
it, so adding a component is one ``@register(...)`` on its batch form.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from tracetune.arithmetic import Claim, arithmetic_claims, calculator_annotations, problem_numbers, shows_calculation
from tracetune.config import RewardWeights
from tracetune.format import KINDS, choice_letter, find_numbers, normalize_text, numbers_match, parse_completion, parse_number, read_answer

# --------------------------------------------------------------------- correctness


def parse_reference(reference: str | float | int) -> float:
    """The reference answer as a number; a reference that is not a number is a data bug.

    Raising here, rather than scoring 0 or 1, keeps a broken dataset from silently
    training the policy (open-r1's rewards once returned the maximum in this case).
    """
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        return float(reference)
    value = parse_number(str(reference))
    if value is None:
        raise ValueError(f"reference answer {reference!r} is not a number")
    return value


Choices = Mapping[str, str] | Sequence[tuple[str, str]]  # a choice row's options, letter -> text


def numeric_correct(answer: str | None, reference: str | float) -> float:
    """1.0 if the answer's number (its last) equals the reference number, else 0.0."""
    predicted = parse_number(answer)
    return 1.0 if numbers_match(predicted, parse_reference(reference)) else 0.0


def choice_correct(answer: str | None, reference: str, choices: Choices) -> float:
    """1.0 if the answer names exactly the reference's option (``format.choice_letter``:
    "B", "(B)", "Option B", "B. <its text>", ...), else 0.0 ("A or B" names two).
    A reference that is not one of the options' letters is a data bug: ValueError."""
    options = dict(choices)
    letter = str(reference).strip().upper()
    if letter not in options:
        raise ValueError(f"reference {reference!r} is not one of the options {', '.join(options) or '(none given)'}")
    return 1.0 if choice_letter(answer, options) == letter else 0.0


def text_correct(answer: str | None, reference: str) -> float:
    """1.0 if the answer equals the reference after SQuAD's normalisation (case,
    punctuation, articles, whitespace: ``format.normalize_text``), else 0.0.
    A reference that normalises to nothing is a data bug: ValueError."""
    expected = normalize_text(str(reference))
    if not expected:
        raise ValueError(f"reference answer {reference!r} is empty once normalised")
    return 1.0 if answer is not None and normalize_text(answer) == expected else 0.0


def correctness(completion: str, reference: str | float, kind: str = "numeric", choices: Choices | None = None) -> float | None:
    """1.0 if the single ``<answer>`` block states the reference, read as ``kind``
    reads it, else 0.0; None for an ``open`` row, which has no reference to check.

    No answer block, two answer blocks, or nothing readable in the answer: 0.0.
    The answer is not looked for in the reasoning: a right number there is not an answer.
    """
    answer = parse_completion(completion).answer
    if kind == "numeric":
        return numeric_correct(answer, reference)
    if kind == "choice":
        return choice_correct(answer, str(reference), choices or {})
    if kind == "text":
        return text_correct(answer, str(reference))
    if kind == "open":
        return None
    raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")


def soundness(completion: str, reference: str | float, kind: str = "numeric", choices: Choices | None = None) -> float | None:
    """1.0 if the answer is right (``correctness``) and every ``expr = value`` claim
    in the completion holds, else 0.0; None where correctness is None (an open row).

    The claims are ``arithmetic.arithmetic_claims``'s, the evaluator the arithmetic
    reward and the failure analysis read. A small model's right answers are often
    luck: the SFT 270M's ``60/200 = 0.25 ... 100 - 60 = 40`` answers 40, the reference,
    and 6 of its 9 right answers on 500 GSM8K test problems held a false claim.

    >>> soundness("<reasoning>48 / 2 = 24, 48 + 24 = 72.</reasoning>\n<answer>72</answer>", "72")
    1.0
    >>> soundness("<reasoning>48 / 2 = 20, 48 + 24 = 72.</reasoning>\n<answer>72</answer>", "72")
    0.0
    """
    right = correctness(completion, reference, kind, choices)
    if right is None:
        return None
    return float(right == 1.0 and all(claim.holds for claim in arithmetic_claims(completion)))


# --------------------------------------------------------------------------- trace

TRANSITION_WORDS = frozenset({"first", "then", "next", "so", "thus", "therefore", "hence", "finally"})
# Spelled out in both cases instead of IGNORECASE with \b, which is several times
# slower to scan (see _STEP_TAIL).
CONCLUSION_CUES = re.compile(
    r"(?<![A-Za-z])([Tt]herefore|THEREFORE|[Tt]hus|[Hh]ence|[Ss]o|SO|[Ii]n total|[Tt]he answer is)(?![A-Za-z])"
)

# "Step 3:" anywhere, or a numbered line "3." / "3)" at the start of a line. Two
# patterns that each start with a literal, instead of one alternation with \b and
# IGNORECASE, which made every position of the text slow to reject (4x slower).
# _STEP_TAIL starts with a literal, which re scans for fastest; the "S"/"s" before
# it, not glued to a previous word, is checked in Python.
_STEP_TAIL = re.compile(r"tep[ \t]*[0-9]+[ \t]*[:.)]")
_NUMBERED_LINE = re.compile(r"\n[ \t]*[0-9]+[.)](?=[ \t])")
_SENTENCE_ENDS = (". ", "! ", "? ", "\n")

# Rubric weights (they sum to 1) and bounds. GSM8K reference solutions have 2 to 11
# lines, so 2 distinct steps earn full step credit and more than 12 counts as padding.
TRACE_RUBRIC = {"steps": 0.35, "calculations": 0.25, "transitions": 0.15, "conclusion": 0.25}
FULL_CREDIT_STEPS = 2
FULL_CREDIT_CALCULATIONS = 2
FULL_CREDIT_TRANSITIONS = 2
MAX_STEPS = 12
OUTSIDE_TEXT_FACTOR = 0.5
# A step whose words, numbers aside, are an earlier step's is a repeat when at
# least this many words are left. Honest steps that share a sentence frame differ
# in their words ("He buys 3 apples at 2 each" / "She buys 4 pears at 5 each"); a
# frame of 4+ words repeated with other numbers is a loop ("She makes $2 per egg
# for 2 eggs" / "She makes $3 per egg for 4 eggs"). Shorter frames are bare
# arithmetic ("Then 48 + 24 = 72." / "Then 72 - 10 = 62."), which honest traces
# repeat all the time: only their verbatim repeats count. Measured on GSM8K's own
# solutions as SFT targets: 1.2% (train) and 1.7% (test) hold such a frame twice,
# parallel steps such as "5 tables have 3 chairs each ..." / "4 tables have 6
# chairs each ...", and lose a share of their trace score for it.
TEMPLATE_MIN_WORDS = 4
# Prose kinds (every kind but numeric): a step that brings fewer than this many
# content words the question does not already hold is hollow, neither a step nor
# neutral: filler ("Let me think.", "This is important.": no content word at all)
# or the question said again ("The question asks why ice floats on water."). A
# step that shows a calculation is never hollow. Numeric rows keep the rubric they
# were trained and reported with: GSM8K steps restate the problem's quantities by
# design ("Natalia sold 48 clips in April"), and their scores stay bit-identical.
MIN_NEW_WORDS = 2
# Words that carry no content of their own in a step: articles, pronouns, auxiliaries,
# prepositions, conjunctions, the transition words, and the vocabulary of thinking
# aloud about the task. Small and closed on purpose: a word left out only makes a
# filler step look like content, it never makes a real step hollow.
FILLER_WORDS = frozenset(
    """
    a an the this that these those it its they them their there here i me my we us our you your he him his she her
    is are was were be been being am do does did done have has had will would shall should can could may might must
    of in on at to for from by with as into onto about over under than then so if or and but not no nor yes also too
    very really quite just only even still again now well okay ok hmm wait sure yeah
    let lets think thinking thought consider considering note noting notice important importantly interesting
    clearly obviously basically actually simply indeed certainly surely carefully careful remember recall
    question questions answer answers ask asks asked asking problem task prompt request step steps
    need needs needed want wants look looking see start begin continue proceed figure out understand
    what which who whom whose why how when where whether something anything everything nothing thing things
    first next finally thus therefore hence
    """.split()
)


# Words for comparing steps: ASCII letters and digits, lowercased. A bytes
# translation is ~2.5x faster than re.findall here (rewards run on every rollout).
_WORD_BYTES = bytes.maketrans(
    string.punctuation.encode() + string.ascii_uppercase.encode(),
    b" " * len(string.punctuation) + string.ascii_lowercase.encode(),
)
_TRANSITION_BYTES = frozenset(w.encode() for w in TRANSITION_WORDS)


def _words(text: str) -> list[bytes]:
    """``"Then, 48/2 = 24."`` -> ``[b"then", b"48", b"2", b"24"]`` (non-ASCII dropped)."""
    return text.encode("ascii", "ignore").translate(_WORD_BYTES).split()


def _is_substantive(words: list[bytes]) -> bool:
    """A step with content: at least 3 words, at least 2 of them not transition words."""
    return len(words) >= 3 and len(words) - sum(map(_TRANSITION_BYTES.__contains__, words)) >= 2


_FILLER_BYTES = frozenset(w.encode() for w in FILLER_WORDS)


def _stem(word: bytes) -> bytes:
    """A plural's singular, roughly ("floats" -> "float", "gas" and "glass" stay):
    enough that a restated question cannot pass for new words by one letter."""
    return word[:-1] if len(word) > 3 and word.endswith(b"s") and not word.endswith(b"ss") else word


def _content(words: Sequence[bytes]) -> set[bytes]:
    """The content words among ``words``: neither FILLER_WORDS nor single letters."""
    return {_stem(w) for w in words if w not in _FILLER_BYTES and (len(w) > 1 or w.isdigit())}


@functools.lru_cache(maxsize=4096)  # the G completions of a prompt share its question
def _question_words(question: str) -> frozenset[bytes]:
    return frozenset(_content(_words(question)))


def _hollow(words: Sequence[bytes], question_words: frozenset[bytes]) -> bool:
    """A prose step that adds fewer than MIN_NEW_WORDS content words to the question's."""
    return len(_content(words) - question_words) < MIN_NEW_WORDS


def _template(key: bytes) -> bytes | None:
    """A step's wording (its ``_words`` joined) without its numbers, or None when
    fewer than TEMPLATE_MIN_WORDS words are left to compare. Three C-level calls:
    the trace term runs on every rollout.

    ``b"she sold 48 2 24 clips in may"`` -> ``b"she sold clips in may"``.
    """
    rest = key.translate(None, b"0123456789").split()
    return b" ".join(rest) if len(rest) >= TEMPLATE_MIN_WORDS else None


def split_steps(reasoning: str) -> tuple[list[str], int]:
    """The text of each marked step, and the number of step markers.

    Without markers the whole reasoning is one unmarked segment (returned with 0
    markers), so calculations and the conclusion still count but steps do not.
    """
    # Numbered lines are searched in "\n" + text, so index i there is i - 1 here.
    spans = [
        (m.start() - 1, m.end())
        for m in _STEP_TAIL.finditer(reasoning, 1)
        if reasoning[m.start() - 1] in "Ss" and (m.start() < 2 or not reasoning[m.start() - 2].isalnum())
    ]
    spans += [(m.start(), m.end() - 1) for m in _NUMBERED_LINE.finditer("\n" + reasoning)]
    markers: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if not markers or start >= markers[-1][1]:  # "1. Step 1:" is one marker
            markers.append((start, end))
    if not markers:
        return [reasoning], 0
    ends = [end for _, end in markers]
    starts = [start for start, _ in markers[1:]] + [len(reasoning)]
    return [reasoning[e:s] for e, s in zip(ends, starts)], len(markers)


def trace_breakdown(completion: str, question: str | None = None, kind: str = "numeric",
                    choices: Choices | None = None) -> dict[str, float]:
    """The rubric's parts for one completion, each in [0, 1], and the total.

    Rubric (weights sum to 1, then multiplied by three penalty factors)::

        0.35 steps         distinct substantive marked steps, full credit at 2
        0.25 calculations  distinct steps that show a calculation, full credit at 2
        0.15 transitions   distinct steps using first/then/next/so/thus/therefore/
                           hence/finally, plus a conclusion opened by one of
                           them, full credit at 2
        0.25 conclusion    the last step ends in a conclusion cue (therefore, so,
                           thus, hence, in total, the answer is) followed by the
                           answer's number (0.5 if there is no parseable answer
                           and a number follows)
        x repetition       distinct steps / (distinct + repeated + hollow) steps
        x padding          1 up to 12 step markers, then falls linearly to 0 at 24
        x outside          0.5 if there is non-whitespace text outside the tags

    A repeated step is one whose words (case, punctuation and spacing aside) are an
    earlier step's, or whose words without their numbers are an earlier step's
    (``TEMPLATE_MIN_WORDS``). The conclusion is cut from the final
    step before steps are compared. Repetition costs: a repeat is no distinct step,
    so it adds nothing, and it lowers the total through the repetition factor
    (a trace of 3 distinct steps and 1 repeat keeps 3/4). Empty steps add nothing
    and count as padding.

    ``kind`` is the row's task kind (``format.KINDS``); a numeric row (the default)
    is scored as above, whatever ``question`` says. The prose kinds (choice, text,
    open) differ in three ways:

    * hollow steps: a step bringing fewer than MIN_NEW_WORDS content words beyond
      the question's (filler, or the question restated) is no step and lowers the
      repetition factor as a repeat does (``FILLER_WORDS``);
    * the conclusion: the cue must be followed by a statement (any word), which
      for a choice row may not name another option than the answer does; 0.5 when
      the answer states nothing readable (``format.read_answer``);
    * calculations are weighed only when ``question`` holds a number (a digit); for
      a prompt without one, the other three parts are renormalised to weigh 1
      (steps 0.35/0.75, transitions 0.15/0.75, conclusion 0.25/0.75). The part is
      still reported.

    Without ``question`` no step is compared with it and calculations are weighed.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
    prose = kind != "numeric"
    parsed = parse_completion(completion)
    # With no reasoning block the whole completion is judged as reasoning, at the
    # outside-text penalty: a trace without tags still earns some shaping signal.
    body = parsed.reasoning if parsed.reasoning is not None else completion
    segments, n_markers = split_steps(body)

    # The conclusion is the sentence holding the last cue of the final segment. It is
    # scored on its own and cut from that segment, so a repeated step cannot become
    # "distinct" just by carrying the conclusion.
    conclusion, concludes_with_transition = 0.0, False
    final = segments[-1]
    cue = None
    for cue in CONCLUSION_CUES.finditer(final):
        pass
    if cue is not None:
        start = max((i + len(end) for end in _SENTENCE_ENDS if (i := final.rfind(end, 0, cue.start())) >= 0), default=0)
        sentence = final[start:]
        segments[-1] = final[:start]
        if prose:
            conclusion = _prose_conclusion(final[cue.end() :], parsed.answer, kind, choices)
            concludes_with_transition = conclusion > 0 and not _TRANSITION_BYTES.isdisjoint(_words(sentence))
        elif (stated := parse_number(final[cue.end() :])) is not None:
            concludes_with_transition = not _TRANSITION_BYTES.isdisjoint(_words(sentence))
            answer = parse_number(parsed.answer)
            if answer is None:
                conclusion = 0.5
            else:  # a conclusion that contradicts the answer is no conclusion
                conclusion = 1.0 if numbers_match(stated, answer) else 0.0

    # Normalised step text -> (shows a calculation, uses a transition word), first
    # occurrence of each distinct substantive step only; the number-free wordings
    # seen, to catch a step repeated with other numbers.
    distinct: dict[bytes, tuple[bool, bool]] = {}
    templates: set[bytes] = set()
    n_repeats = n_hollow = 0
    question_words = _question_words(question) if prose and question is not None else frozenset()
    for segment in segments:
        words = _words(segment)
        if not _is_substantive(words):
            continue
        key = b" ".join(words)
        if key in distinct or (template := _template(key)) in templates:
            n_repeats += 1
            continue
        calculation = shows_calculation(segment)
        if prose and not calculation and _hollow(words, question_words):
            n_hollow += 1
            continue
        distinct[key] = (calculation, not _TRANSITION_BYTES.isdisjoint(words))
        if template is not None:
            templates.add(template)

    n_steps = len(distinct) if n_markers else 0
    n_calculations = sum(calc for calc, _ in distinct.values())
    n_transitions = sum(trans for _, trans in distinct.values()) + concludes_with_transition

    parts = {
        "steps": min(n_steps, FULL_CREDIT_STEPS) / FULL_CREDIT_STEPS,
        "calculations": min(n_calculations, FULL_CREDIT_CALCULATIONS) / FULL_CREDIT_CALCULATIONS,
        "transitions": min(n_transitions, FULL_CREDIT_TRANSITIONS) / FULL_CREDIT_TRANSITIONS,
        "conclusion": conclusion,
    }
    repetition = len(distinct) / (len(distinct) + n_repeats + n_hollow) if n_repeats or n_hollow else 1.0
    padding = 1.0 if n_markers <= MAX_STEPS else max(0.0, 1.0 - (n_markers - MAX_STEPS) / MAX_STEPS)
    outside = OUTSIDE_TEXT_FACTOR if parsed.outside.strip() else 1.0
    if prose and question is not None and not find_numbers(question):
        rubric = {k: w for k, w in TRACE_RUBRIC.items() if k != "calculations"}
        weighed = sum(rubric[k] * parts[k] for k in rubric) / math.fsum(rubric.values())
    else:
        weighed = sum(TRACE_RUBRIC[k] * v for k, v in parts.items())
    total = weighed * repetition * padding * outside
    return {**parts, "repetition": repetition, "padding": padding, "outside": outside,
            "n_steps": float(n_steps), "n_repeats": float(n_repeats), "n_hollow": float(n_hollow), "total": total}


def _prose_conclusion(statement: str, answer: str | None, kind: str, choices: Choices | None) -> float:
    """The conclusion part of a prose kind's trace: 1.0 for a statement after the
    cue, 0.0 for none ("So.") or a choice conclusion naming another option than the
    answer; 0.5 for a statement when the answer states nothing readable."""
    if not any(ch.isalnum() for ch in statement):
        return 0.0
    options = dict(choices or {})
    answered = read_answer(answer, kind, options)
    if answered is None:
        return 0.5
    if kind == "choice" and (stated := choice_letter(statement, options)) is not None and stated != answered:
        return 0.0  # a conclusion that contradicts the answer is no conclusion
    return 1.0


def trace_structure(completion: str, question: str | None = None, kind: str = "numeric", choices: Choices | None = None) -> float:
    """The trace rubric's total in [0, 1]; see ``trace_breakdown`` for the rubric."""
    return trace_breakdown(completion, question, kind, choices)["total"]


# ---------------------------------------------------------------------- confidence


def answer_token_logprobs(
    completion: str, token_texts: Sequence[str], token_logprobs: Sequence[float]
) -> list[float] | None:
    """Log-probabilities of the tokens that spell the answer's content, or None.

    A token belongs to the answer if its characters overlap the stripped content of
    the ``<answer>`` block. ``token_texts`` must concatenate to the completion (the
    generator decodes incrementally to guarantee it); anything else is a bug upstream.
    """
    if len(token_texts) != len(token_logprobs):
        raise ValueError(f"{len(token_texts)} token texts but {len(token_logprobs)} log-probabilities")
    if "".join(token_texts) != completion:
        raise ValueError("token_texts do not concatenate to the completion")
    span = parse_completion(completion).answer_span
    if span is None:
        return None
    content = completion[span[0] : span[1]]
    start = span[0] + len(content) - len(content.lstrip())
    end = span[1] - (len(content) - len(content.rstrip()))
    if end <= start:
        return None
    # ends[i] is where token i stops; tokens first..last overlap [start, end).
    ends = list(itertools.accumulate(map(len, token_texts)))
    first = bisect.bisect_right(ends, start)
    last = bisect.bisect_left(ends, end)
    return [float(lp) for lp in token_logprobs[first : last + 1]]


def confidence_from_logprobs(is_correct: bool, answer_logprobs: Sequence[float] | None) -> float:
    """Calibration in the spirit of RLPR (Yu et al., 2025): p if right, 1 - p if wrong.

    p is the geometric-mean probability of the answer tokens, exp(mean log p), so a
    confident wrong answer scores near 0 and an unsure wrong one near 1. No answer: 0.
    """
    if not answer_logprobs:
        return 0.0
    mean = math.fsum(answer_logprobs) / len(answer_logprobs)
    p = math.exp(min(0.0, mean)) if math.isfinite(mean) else 0.0
    return p if is_correct else 1.0 - p


def confidence_score(
    completion: str,
    reference: str | float,
    answer_logprobs: Sequence[float] | None,
    *,
    correct: float | None = None,
    kind: str = "numeric",
    choices: Choices | None = None,
) -> float | None:
    """The calibration reward given the answer tokens' log-probabilities (already
    selected, e.g. by ``answer_token_logprobs``). An answer with nothing readable
    (no number, for a numeric row) counts as none. ``correct`` may pass a
    correctness already computed for this completion. None for an open row:
    calibration needs a right or wrong."""
    if kind == "open":
        return None
    if read_answer(parse_completion(completion).answer, kind, choices) is None:
        return 0.0
    if correct is None:
        correct = correctness(completion, reference, kind, choices)
    return confidence_from_logprobs(correct == 1.0, answer_logprobs)


def confidence(
    completion: str,
    reference: str | float,
    token_texts: Sequence[str],
    token_logprobs: Sequence[float],
    kind: str = "numeric",
    choices: Choices | None = None,
) -> float | None:
    """The calibration reward for one completion from its tokens and their log-probabilities."""
    return confidence_score(completion, reference, answer_token_logprobs(completion, token_texts, token_logprobs),
                            kind=kind, choices=choices)


# ---------------------------------------------------------------------- arithmetic

# With no reference solution to count steps in (or one without annotations, 1% of
# GSM8K's train split), one grounded true claim is enough.
NEEDED_WITHOUT_SOLUTION = 1
# Claims past max(WALL_FACTOR x needed, WALL_MIN) are a wall and each costs as a
# false one. GSM8K's train solutions need 1 to 9 calculations (2 to 4 for 77% of
# them); three times that leaves room for another route and a check (WALL_MIN for
# short problems), not for padding.
WALL_FACTOR, WALL_MIN = 3, 6
# A reasoning with more claims than this (repeats included) is a wall that scores
# 0; reading stops there, so the work per completion is bounded.
SCAN_LIMIT = 100
# Constants a claim may use beside the problem's numbers, as it may use the factors
# the problem's words imply: 1 ("1 + 4 animals", "1 - 0.2", "108 * (1/2)") and 2
# (halving, doubling, pairs). A claim needs one operand that is a quantity of the
# problem (or a result) besides them, so "1 + 1 = 2" pays nothing, nor "2 + 2 = 4"
# in a problem that says "half".
FREE_CONSTANTS = (1.0, 2.0)
_TOL = 1e-6


def _claim_key(claim: Claim) -> tuple[tuple[float, ...], str, float]:
    """What makes two claims the same: their numbers and operators in any order, and
    the value claimed ("3 * 4 = 12", "4 x 3 = 12" and "<<3*4=12>>" are one claim)."""
    return tuple(sorted(round(o.value, 6) for o in claim.operands)), "".join(sorted(claim.operators)), round(claim.claimed, 6)


class _Problem(NamedTuple):
    anchors: tuple[float, ...]  # sorted
    supports: tuple[float, ...]  # sorted
    copied: frozenset[tuple]  # the question's own claims (``_claim_key``)
    needed: int
    milestones: tuple[float, ...]  # sorted


@functools.lru_cache(maxsize=4096)  # the G completions of a prompt share its problem
def _problem(question: str, solution: str) -> _Problem:
    """What the arithmetic rubrics read in a problem and its reference solution.

    Anchors are the question's quantities and the reference solution's results (a
    model that computed one correctly, in words or in its head, may use it);
    supports are the factors the question's words imply and FREE_CONSTANTS;
    ``needed`` counts the calculations (the solution's calculator annotations);
    milestones are the distinct results of those calculations that the question
    does not state itself (``progress``'s way points).
    """
    numbers = problem_numbers(question)
    annotations = calculator_annotations(solution)
    results = [claim.claimed for a in annotations for claim in arithmetic_claims(a)]
    anchors = tuple(sorted({*numbers.quantities, *results}))
    supports = tuple(sorted({*numbers.factors, *FREE_CONSTANTS}))
    copied = frozenset(map(_claim_key, arithmetic_claims(question, limit=SCAN_LIMIT)))
    stated = sorted(numbers.quantities)
    milestones = tuple(sorted({r for r in results if not _among(r, 0.0, stated)}))
    return _Problem(anchors, supports, copied, len(annotations) or NEEDED_WITHOUT_SOLUTION, milestones)


def _among(value: float, ulp: float, numbers: Sequence[float]) -> bool:
    """``value``, written to ``ulp``, is one of the sorted ``numbers``, or one of
    them rounded ("3.33" for 10 / 3; a whole number only for an exact match)."""
    slack = max(_TOL * abs(value), 1e-9, ulp / 2 if ulp < 1 else 0.0)
    i = bisect.bisect_left(numbers, value - slack)
    return i < len(numbers) and numbers[i] <= value + slack


def _trivial(claim: Claim) -> bool:
    """True and no work: the result is an operand, the others all 0 or 1 (x * 1,
    x + 0); a number against itself (x / x = 1, x - x = 0); a product with 0."""
    values = [o.value for o in claim.operands]
    if not claim.holds:
        return False
    if len(values) == 2 and claim.operators in ("/", "-") and math.isclose(values[0], values[1], rel_tol=_TOL, abs_tol=1e-9):
        return True
    if set(claim.operators) == {"*"} and 0.0 in values:
        return True
    return any(
        math.isclose(claim.claimed, v, rel_tol=_TOL, abs_tol=1e-9) and all(u in (0.0, 1.0) for u in values[:i] + values[i + 1 :])
        for i, v in enumerate(values)
    )


def arithmetic_breakdown(completion: str, question: str, solution: str = "") -> dict[str, float]:
    """The arithmetic rubric's counts for one completion, and its total in [0, 1].

    The claims are the checkable ``expr = number`` claims of the ``<reasoning>``
    block (``arithmetic.arithmetic_claims``, the failure analysis's own), in order.
    Claims elsewhere (the answer, text outside the tags) are not read.

    * dropped, paying and costing nothing: a claim made earlier (numbers and
      operators in any order, same value: counted once), a claim the question
      itself makes, and a trivial one (``x * 1 = x``, ``x + 0 = x``, ``x / x = 1``,
      ``x - x = 0``, ``x * 0 = 0``);
    * rounded, paying and costing nothing: a claim that holds only by rounding
      more than 1% (``10 / 3 = 3``; ``Claim.precise``): a policy learned to write
      ``a / b = 1`` claims when rounding paid;
    * grounded: every operand is an anchor (a quantity the question gives, a
      result of its reference solution, the result of an earlier grounded claim)
      or a support (a factor the question's words imply, ``FREE_CONSTANTS``), and
      one at least is an anchor (``arithmetic.problem_numbers``);
    * needed: the reference solution's calculator annotations (GSM8K writes one
      ``<<a*b=c>>`` per calculation), NEEDED_WITHOUT_SOLUTION without one;
    * a wall: every claim past max(WALL_FACTOR x needed, WALL_MIN) counts as false,
      and a reasoning with more than SCAN_LIMIT claims scores 0.

    With T grounded true claims, at most ``needed`` of them paid (more true claims
    cannot dilute a false one), and F false claims, grounded or not::

        T' = min(T, needed)
        total = (T' / needed) * (T' / (T' + F))        0 when T' = 0
                 coverage       share of true claims

    A false claim costs more than a missing one (1 true of 2 needed: 0.5; with one
    false beside it: 0.25): the component pays for arithmetic that is right, not
    for writing more of it. Ungrounded true claims pay nothing and cost nothing.
    What it cannot see: a calculation with words between its numbers ("5
    snakes/jaguar * 6 jaguars = 30") is no claim, so it neither pays nor costs (on
    GSM8K's train solutions, curated as SFT targets, 16% hold no claim it reads);
    and a grounded true claim pays whether or not the problem needs it
    (correctness judges the plan).

    Worked example. "Natalia sold clips to 48 of her friends in April, and then she
    sold half as many clips in May. How many clips did Natalia sell altogether?",
    whose solution has 2 annotations (needed = 2). The reasoning "48 / 2 = 24.
    1 + 1 = 2. 48 + 24 = 73. 24 + 48 = 73." has: 48 / 2 = 24 grounded (48 and 2)
    and true; 1 + 1 = 2 true but of free constants only (ungrounded); 48 + 24 = 73
    grounded (24 is the first claim's result) and false; 24 + 48 = 73 the same
    claim again (dropped). T' = 1, F = 1: total = (1/2) * (1/2) = 0.25. Written
    right, 48 + 24 = 72, it is (2/2) * (2/2) = 1.
    """
    counts = {"true": 0.0, "false": 0.0, "ungrounded": 0.0, "rounded": 0.0, "dropped": 0.0, "wall": 0.0}
    reasoning = parse_completion(completion).reasoning
    anchors, supports, copied, needed, milestones = _problem(question, solution)
    claims = arithmetic_claims(reasoning, limit=SCAN_LIMIT + 1) if reasoning is not None else []
    if len(claims) > SCAN_LIMIT:
        counts["wall"] = float(len(claims))
        return {**counts, "needed": float(needed), "milestones": float(len(milestones)), "reached": 0.0, "total": 0.0}
    reached: set[float] = set()  # milestones that a true grounded claim computed
    known = list(anchors)  # grows by each grounded claim's result
    seen: set[tuple] = set()
    cap = max(WALL_FACTOR * needed, WALL_MIN)
    counted = 0
    for claim in claims:
        key = _claim_key(claim)
        if key in seen or key in copied or _trivial(claim):
            counts["dropped"] += 1
            continue
        seen.add(key)
        counted += 1
        if counted > cap:
            counts["wall"] += 1
            counts["false"] += 1
            continue
        anchored = [_among(o.value, o.ulp, known) for o in claim.operands]
        grounded = any(anchored) and all(a or _among(o.value, o.ulp, supports) for a, o in zip(anchored, claim.operands))
        if grounded:
            bisect.insort(known, claim.claimed)
        if not claim.holds:
            counts["false"] += 1
        elif not claim.precise:
            counts["rounded"] += 1
        elif grounded:
            counts["true"] += 1
            reached.update(m for m in milestones if _among(m, 0.0, (claim.claimed,)))
        else:
            counts["ungrounded"] += 1
    paid = min(counts["true"], needed)
    total = (paid / needed) * (paid / (paid + counts["false"])) if paid else 0.0
    return {**counts, "needed": float(needed), "milestones": float(len(milestones)), "reached": float(len(reached)),
            "total": total}


def arithmetic(completion: str, question: str, solution: str = "", kind: str = "numeric") -> float | None:
    """The arithmetic rubric's total in [0, 1]; see ``arithmetic_breakdown`` for the
    rubric. None for a non-numeric row whose question holds no number (a digit):
    there is nothing to ground a claim in, so no claim could pay."""
    if kind != "numeric" and not find_numbers(question):
        return None
    return arithmetic_breakdown(completion, question, solution)["total"]


# Claims a completion may spend per milestone before its progress is diluted: the
# reference's route plus one more calculation (another route, a check) is free.
FREE_EXTRA_CLAIMS = 1


def progress(completion: str, question: str, solution: str = "") -> float | None:
    """How far along the reference solution's way the reasoning got, in [0, 1].

    The way points (milestones) are the distinct results of the reference solution's
    calculator annotations that the question does not state itself. A milestone is
    reached when a true, grounded claim of the ``<reasoning>`` block computes it,
    under the arithmetic rubric's own reading (``arithmetic_breakdown``: the same
    claims, dropped, rounded and wall claims included, so a repeated, copied or
    trivial claim, a claim outside the reasoning and a wall reach nothing). With M
    milestones, H reached and C claims counted (every claim the rubric does not
    drop, true or false, those past its wall cap included)::

        progress = (H / M) * min(1, (M + FREE_EXTRA_CLAIMS) / C)        0 when H = 0

    The second factor dilutes a spray of calculations: trying every sum and
    product of the question's numbers reaches a milestone by luck, and pays less
    than reaching it on purpose. None where there is nothing to measure against:
    no reference solution, or none of its results is new (every such row is
    renormalised away in the composite, as for any undefined component).

    Why beside correctness: on the 270M's SFT policy one sample in sixty is right,
    by luck (the right number after false steps), so few groups of G hold a right
    and a wrong answer; one sample in twelve reaches a milestone, and one group in
    five differs in progress (docs/runs.md, 2026-12-06).

    Worked example (Natalia, milestones 24 and 72). "48 / 2 = 24. 24 + 48 = 73."
    reaches 24 with 2 claims counted: (1/2) * min(1, 3/2) = 0.5. "48 + 2 = 50. 48 - 2
    = 46. 48 * 2 = 96. 48 / 2 = 24." reaches 24 with 4 counted: (1/2) * (3/4) =
    0.375. "48 / 2 = 24. 48 + 24 = 72." reaches both: 1.
    """
    parts = arithmetic_breakdown(completion, question, solution)
    if not parts["milestones"]:
        return None
    if not parts["reached"]:
        return 0.0
    counted = parts["true"] + parts["false"] + parts["ungrounded"] + parts["rounded"]
    return parts["reached"] / parts["milestones"] * min(1.0, (parts["milestones"] + FREE_EXTRA_CLAIMS) / counted)


# ---------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Reward:
    """A registered component of the composite: its batch form and what it needs.

    ``columns`` are the batch columns it reads, as alternatives (any one set is
    enough); ``default_weight`` is its weight in ``RewardWeights()``; ``label``
    names its evaluation metric (``scoring``).
    """

    name: str
    fn: Callable[..., list[float | None]]
    columns: tuple[tuple[str, ...], ...]
    default_weight: float
    label: str

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
        if not self.available(columns):
            raise ValueError(f"the {self.name} reward needs the columns {self.needs()}")
        return self.fn(prompts, completions, **columns)

    def available(self, columns: Mapping[str, Any]) -> bool:
        return any(all(columns.get(name) is not None for name in group) for group in self.columns)

    def needs(self) -> str:
        """``"'token_texts' and 'token_logprobs', or 'answer_logprobs'"``."""
        return ", or ".join(" and ".join(f"'{name}'" for name in group) for group in self.columns)


# Metric keys are "reward/<name>" (tracetune's one name per concept); the order of
# registration is the order of the positional --reward-weights form.
REWARDS: dict[str, Reward] = {}


def register(name: str, *, columns: tuple[tuple[str, ...], ...] = ((),), default_weight: float = 0.0,
             label: str) -> Callable[[Callable[..., list[float]]], Callable[..., list[float]]]:
    """Register a batch reward as a component of the composite (see the module docstring)."""

    def add(fn: Callable[..., list[float]]) -> Callable[..., list[float]]:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = Reward(name, fn, columns, default_weight, label)
        return fn

    return add


# ------------------------------------------------------------------- batch forms


def _per_row(column: Sequence[Any] | None, n: int, default: Any) -> Sequence[Any]:
    """An optional column, or ``default`` for each of the ``n`` rows without it."""
    return column if column is not None else [default] * n


@register("correctness", columns=(("reference",),), default_weight=0.6, label="GSM8K accuracy")
def correctness_reward(prompts: Sequence[str], completions: Sequence[str], reference: Sequence[Any],
                       kind: Sequence[str] | None = None, choices: Sequence[Choices | None] | None = None,
                       **_: Any) -> list[float | None]:
    n = len(completions)
    return [correctness(c, r, k, o) for c, r, k, o in
            zip(completions, reference, _per_row(kind, n, "numeric"), _per_row(choices, n, None), strict=True)]


@register("trace", default_weight=0.25, label="Avg trace score")
def trace_reward(prompts: Sequence[str], completions: Sequence[str], question: Sequence[str] | None = None,
                 kind: Sequence[str] | None = None, choices: Sequence[Choices | None] | None = None,
                 **_: Any) -> list[float]:
    # The question decides whether a prose row's calculations are weighed; without
    # the column, the prompt (whose templates add no digit) stands in for it.
    n = len(completions)
    questions = question if question is not None else prompts
    return [trace_structure(c, q, k, o) for c, q, k, o in
            zip(completions, questions, _per_row(kind, n, "numeric"), _per_row(choices, n, None), strict=True)]


@register("confidence", columns=(("reference", "token_texts", "token_logprobs"), ("reference", "answer_logprobs")),
          default_weight=0.15, label="Avg confidence reward")
def confidence_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    reference: Sequence[Any],
    token_texts: Sequence[Sequence[str]] | None = None,
    token_logprobs: Sequence[Sequence[float]] | None = None,
    answer_logprobs: Sequence[Sequence[float] | None] | None = None,
    kind: Sequence[str] | None = None,
    choices: Sequence[Choices | None] | None = None,
    **_: Any,
) -> list[float | None]:
    n = len(completions)
    kinds, options = _per_row(kind, n, "numeric"), _per_row(choices, n, None)
    if answer_logprobs is not None:  # already selected (the evaluation harness)
        return [confidence_score(c, r, lp, kind=k, choices=o)
                for c, r, lp, k, o in zip(completions, reference, answer_logprobs, kinds, options, strict=True)]
    if token_texts is None or token_logprobs is None:
        raise ValueError(
            "the confidence reward needs the 'token_texts' and 'token_logprobs' columns "
            "(the completion's tokens and their log-probabilities under the policy)"
        )
    return [
        confidence(c, r, t, lp, k, o)
        for c, r, t, lp, k, o in zip(completions, reference, token_texts, token_logprobs, kinds, options, strict=True)
    ]


@register("arithmetic", columns=(("question",),), label="Avg arithmetic reward")
def arithmetic_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    question: Sequence[str],
    solution: Sequence[str] | None = None,
    kind: Sequence[str] | None = None,
    **_: Any,
) -> list[float | None]:
    n = len(completions)
    return [arithmetic(c, q, s or "", k) for c, q, s, k in
            zip(completions, question, _per_row(solution, n, ""), _per_row(kind, n, "numeric"), strict=True)]


@register("judge", columns=(("judge_score",),), label="Avg judge reward")
def judge_reward(prompts: Sequence[str], completions: Sequence[str], judge_score: Sequence[float | None],
                 **_: Any) -> list[float | None]:
    """The LLM judge's score mapped to [0, 1] (``judge.RewardJudge``: absolute
    (s - 1) / 4 for a 1-5 score, or by rank within the group). The scores come in
    as a column: asking the judge is I/O, done by the learner before the pure
    rewards run. A completion the judge did not score is None here, and the
    learner leaves it out of its group's advantage (never paid as a 0)."""
    return [None if s is None else float(s) for s in judge_score]


# Registered after the judge: the positional --reward-weights form keeps its order.
@register("sound", columns=(("reference",),), label="Sound accuracy")
def sound_reward(prompts: Sequence[str], completions: Sequence[str], reference: Sequence[Any],
                 kind: Sequence[str] | None = None, choices: Sequence[Choices | None] | None = None,
                 **_: Any) -> list[float | None]:
    n = len(completions)
    return [soundness(c, r, k, o) for c, r, k, o in
            zip(completions, reference, _per_row(kind, n, "numeric"), _per_row(choices, n, None), strict=True)]


@register("progress", columns=(("question", "solution"),), label="Avg progress reward")
def progress_reward(prompts: Sequence[str], completions: Sequence[str], question: Sequence[str],
                    solution: Sequence[str], **_: Any) -> list[float | None]:
    return [progress(c, q, s or "") for c, q, s in zip(completions, question, solution, strict=True)]


# Components are computed a chunk of completions at a time: every component parses
# each completion, and the parse caches (format.parse_completion, 8192 entries) only
# help while a chunk's completions are all still in them. Component by component
# over a 20,000-completion batch, each parse missed (bench/rewards.py: 25% slower).
CHUNK = 1024


def available_components(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> dict[str, list[float]]:
    """Every registered component whose columns are given, by name (the evaluation's
    metrics: it has no weights to decide by). A column as long as the batch (and
    not a string) is per completion and is cut into chunks with it; any other
    (Tunix's ``mode``) is passed whole."""
    rewards = [reward for reward in REWARDS.values() if reward.available(columns)]
    n = len(completions)
    per_completion = {k for k, v in columns.items() if not isinstance(v, str) and hasattr(v, "__len__") and len(v) == n}
    out: dict[str, list[float]] = {reward.name: [] for reward in rewards}
    for start in range(0, n, CHUNK):
        cut = slice(start, start + CHUNK)
        chunk = {k: v[cut] if k in per_completion else v for k, v in columns.items()}
        for reward in rewards:
            out[reward.name] += reward(prompts[cut], completions[cut], **chunk)
    return out


def reward_components(
    prompts: Sequence[str],
    completions: Sequence[str],
    weights: RewardWeights | None = None,
    **columns: Any,
) -> dict[str, list[float]]:
    """Every component the weights need, plus any other the columns allow (for logging).

    Equal to calling each batch reward in REWARDS. A component with weight 0 is
    skipped when its columns are missing (the no-confidence ablation runs without
    log-probabilities); one with a weight and without its columns is an error.
    """
    w = (weights if weights is not None else RewardWeights()).as_dict()
    if missing := [reward for name, reward in REWARDS.items() if w[name] and not reward.available(columns)]:
        raise ValueError("; ".join(f"the {r.name} reward (weight {w[r.name]:g}) needs the columns {r.needs()}" for r in missing))
    return available_components(prompts, completions, **columns)


def combine(components: Mapping[str, Sequence[float | None]], weights: RewardWeights) -> list[float]:
    """R = sum_k w_k * component_k: the one place where the weights are applied.

    Components with weight 0 may be given (they are logged, not paid); a weighted one
    that is missing is an error, not a silent 0. A row where a weighted component is
    None (undefined for its kind) is renormalised over the components it has (see the
    module docstring); a row with none of them is an error.
    """
    w = weights.as_dict()
    if missing := [name for name, weight in w.items() if weight and name not in components]:
        raise ValueError(f"the composite needs the components {missing} (weights {weights})")
    n = len(next(iter(components.values())))
    paid = [k for k in components if w.get(k)]
    out = []
    for i in range(n):
        defined = [k for k in paid if components[k][i] is not None]
        total = math.fsum(w[k] * components[k][i] for k in defined)
        if len(defined) < len(paid):  # only then: a numeric row's R is exactly the plain sum
            if not defined:
                raise ValueError(f"row {i} has none of the weighted components {paid} (weights {weights}): "
                                 "an open row needs a weighted component that judges it, such as trace")
            total *= math.fsum(w[k] for k in paid) / math.fsum(w[k] for k in defined)
        out.append(total)
    return out


def make_composite_reward(weights: RewardWeights | None = None) -> Callable[..., list[float]]:
    """The composite reward as one batch function, for trainers that sum reward
    functions without weights (Tunix: ``np.nansum``)."""
    weights = weights if weights is not None else RewardWeights()

    def composite(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        return combine(reward_components(prompts, completions, weights, **columns), weights)

    return composite
