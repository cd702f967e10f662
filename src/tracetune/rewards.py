"""Rewards: pure functions shared by GRPO training and evaluation.

The composite reward, declared once::

    R = w_c * correctness + w_t * trace + w_k * confidence
      with correctness in {0, 1}, trace in [0, 1], confidence in [0, 1],
      and (w_c, w_t, w_k) = RewardWeights(), by default (0.6, 0.25, 0.15).

Each reward has a per-sample helper (``correctness``, ``trace_structure``,
``confidence``) and a batch form ``fn(prompts, completions, **columns) -> list[float]``,
the signature Tunix's GRPOLearner and TRL's GRPOTrainer call. Batch columns:
``reference`` (the reference answer, str or number), and for confidence
``token_texts`` / ``token_logprobs`` (the completion's tokens as text, which must
concatenate to the completion, and their log-probabilities under the policy).
Unknown columns (Tunix also passes ``mode``, ``trajectory_ids``...) are ignored.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tracetune.config import RewardWeights
from tracetune.format import numbers_match, parse_completion, parse_number

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


def correctness(completion: str, reference: str | float) -> float:
    """1.0 if the number in the single ``<answer>`` block equals the reference, else 0.0.

    No answer block, two answer blocks, or no number in the answer: 0.0.
    The answer is not looked for in the reasoning: a right number there is not an answer.
    """
    predicted = parse_number(parse_completion(completion).answer)
    return 1.0 if numbers_match(predicted, parse_reference(reference)) else 0.0


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
# A shown calculation: "48 / 2", "0.2 x 50", "3*4", "3 times 4", or "= 24".
_EQUALS_NUMBER = re.compile(r"=[ \t]*\$?-?[0-9.]")
_OPERATION = re.compile(
    r"[0-9][ \t]*[-+*/xX\u00d7\u00f7\u2212\u2013][ \t]*\$?[0-9.]"
    r"|[0-9] (?:plus|minus|times|divided by|multiplied by) \$?[0-9]"
)
_SENTENCE_ENDS = (". ", "! ", "? ", "\n")

# Rubric weights (they sum to 1) and bounds. GSM8K reference solutions have 2 to 11
# lines, so 2 distinct steps earn full step credit and more than 12 counts as padding.
TRACE_RUBRIC = {"steps": 0.35, "calculations": 0.25, "transitions": 0.15, "conclusion": 0.25}
FULL_CREDIT_STEPS = 2
FULL_CREDIT_CALCULATIONS = 2
FULL_CREDIT_TRANSITIONS = 2
MAX_STEPS = 12
OUTSIDE_TEXT_FACTOR = 0.5


def _shows_calculation(text: str) -> bool:
    """``48 / 2``, ``0.2 x 50``, ``3 times 4`` or ``= 24`` (the "=" test is cheap, so first)."""
    return ("=" in text and _EQUALS_NUMBER.search(text) is not None) or _OPERATION.search(text) is not None


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


def trace_breakdown(completion: str) -> dict[str, float]:
    """The rubric's parts for one completion, each in [0, 1], and the total.

    Rubric (weights sum to 1, then multiplied by two penalty factors)::

        0.35 steps         distinct substantive marked steps, full credit at 2
        0.25 calculations  distinct steps that show a calculation, full credit at 2
        0.15 transitions   distinct steps using first/then/next/so/thus/therefore/
                           hence/finally, plus a conclusion opened by one of
                           them, full credit at 2
        0.25 conclusion    the last step ends in a conclusion cue (therefore, so,
                           thus, hence, in total, the answer is) followed by the
                           answer's number (0.5 if there is no parseable answer
                           and a number follows)
        x padding          1 up to 12 step markers, then falls linearly to 0 at 24
        x outside          0.5 if there is non-whitespace text outside the tags

    The conclusion is cut from the final step before steps are compared. Not
    gameable by repetition: repeated and empty steps are not distinct substantive
    steps, so they add nothing, and they still count as padding.
    """
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
        stated = parse_number(final[cue.end() :])
        if stated is not None:
            concludes_with_transition = not _TRANSITION_BYTES.isdisjoint(_words(sentence))
            answer = parse_number(parsed.answer)
            if answer is None:
                conclusion = 0.5
            else:  # a conclusion that contradicts the answer is no conclusion
                conclusion = 1.0 if numbers_match(stated, answer) else 0.0

    # Normalised step text -> (shows a calculation, uses a transition word), first
    # occurrence of each distinct substantive step only.
    distinct: dict[bytes, tuple[bool, bool]] = {}
    for segment in segments:
        words = _words(segment)
        if _is_substantive(words) and (key := b" ".join(words)) not in distinct:
            distinct[key] = (_shows_calculation(segment), not _TRANSITION_BYTES.isdisjoint(words))

    n_steps = len(distinct) if n_markers else 0
    n_calculations = sum(calc for calc, _ in distinct.values())
    n_transitions = sum(trans for _, trans in distinct.values()) + concludes_with_transition

    parts = {
        "steps": min(n_steps, FULL_CREDIT_STEPS) / FULL_CREDIT_STEPS,
        "calculations": min(n_calculations, FULL_CREDIT_CALCULATIONS) / FULL_CREDIT_CALCULATIONS,
        "transitions": min(n_transitions, FULL_CREDIT_TRANSITIONS) / FULL_CREDIT_TRANSITIONS,
        "conclusion": conclusion,
    }
    padding = 1.0 if n_markers <= MAX_STEPS else max(0.0, 1.0 - (n_markers - MAX_STEPS) / MAX_STEPS)
    outside = OUTSIDE_TEXT_FACTOR if parsed.outside.strip() else 1.0
    total = sum(TRACE_RUBRIC[k] * v for k, v in parts.items()) * padding * outside
    return {**parts, "padding": padding, "outside": outside, "n_steps": float(n_steps), "total": total}


def trace_structure(completion: str) -> float:
    """The trace rubric's total in [0, 1]; see ``trace_breakdown`` for the rubric."""
    return trace_breakdown(completion)["total"]


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
) -> float:
    """The calibration reward given the answer tokens' log-probabilities (already
    selected, e.g. by ``answer_token_logprobs``). An answer with no number counts as
    none. ``correct`` may pass a correctness already computed for this completion."""
    if parse_number(parse_completion(completion).answer) is None:
        return 0.0
    if correct is None:
        correct = correctness(completion, reference)
    return confidence_from_logprobs(correct == 1.0, answer_logprobs)


def confidence(
    completion: str,
    reference: str | float,
    token_texts: Sequence[str],
    token_logprobs: Sequence[float],
) -> float:
    """The calibration reward for one completion from its tokens and their log-probabilities."""
    return confidence_score(completion, reference, answer_token_logprobs(completion, token_texts, token_logprobs))


# ------------------------------------------------------------------- batch forms


def correctness_reward(prompts: Sequence[str], completions: Sequence[str], reference: Sequence[Any], **_: Any) -> list[float]:
    return [correctness(c, r) for c, r in zip(completions, reference, strict=True)]


def trace_reward(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
    return [trace_structure(c) for c in completions]


def confidence_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    reference: Sequence[Any],
    token_texts: Sequence[Sequence[str]] | None = None,
    token_logprobs: Sequence[Sequence[float]] | None = None,
    **_: Any,
) -> list[float]:
    if token_texts is None or token_logprobs is None:
        raise ValueError(
            "the confidence reward needs the 'token_texts' and 'token_logprobs' columns "
            "(the completion's tokens and their log-probabilities under the policy)"
        )
    return [
        confidence(c, r, t, lp)
        for c, r, t, lp in zip(completions, reference, token_texts, token_logprobs, strict=True)
    ]


# Metric keys are "reward/<name>" (tracetune's one name per concept).
REWARDS: dict[str, Callable[..., list[float]]] = {
    "correctness": correctness_reward,
    "trace": trace_reward,
    "confidence": confidence_reward,
}


def reward_components(
    prompts: Sequence[str],
    completions: Sequence[str],
    weights: RewardWeights = RewardWeights(),
    **columns: Any,
) -> dict[str, list[float]]:
    """Every component the weights need, plus any other the columns allow (for logging).

    Equal to calling each batch reward in REWARDS, in one pass per completion (the
    correctness is shared with the confidence term). A component with weight 0 is
    skipped when its columns are missing: the no-confidence ablation runs without
    log-probabilities.
    """
    reference = columns["reference"]
    texts, logprobs = columns.get("token_texts"), columns.get("token_logprobs")
    with_confidence = not (weights.confidence == 0 and logprobs is None)
    if with_confidence and (texts is None or logprobs is None):
        confidence_reward(prompts, completions, reference)  # raises the one explanatory error
    out: dict[str, list[float]] = {"correctness": [], "trace": [], **({"confidence": []} if with_confidence else {})}
    for i, completion in enumerate(completions):
        correct = correctness(completion, reference[i])
        out["correctness"].append(correct)
        out["trace"].append(trace_structure(completion))
        if with_confidence:
            answer_logprobs = answer_token_logprobs(completion, texts[i], logprobs[i])
            out["confidence"].append(confidence_score(completion, reference[i], answer_logprobs, correct=correct))
    return out


def combine(components: Mapping[str, Sequence[float]], weights: RewardWeights) -> list[float]:
    """R = sum_k w_k * component_k: the one place where the weights are applied."""
    w = weights.as_dict()
    n = len(next(iter(components.values())))
    return [math.fsum(w[k] * components[k][i] for k in components if w[k]) for i in range(n)]


def make_composite_reward(weights: RewardWeights = RewardWeights()) -> Callable[..., list[float]]:
    """The composite reward as one batch function, for trainers that sum reward
    functions without weights (Tunix: ``np.nansum``)."""

    def composite(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        return combine(reward_components(prompts, completions, weights, **columns), weights)

    return composite
