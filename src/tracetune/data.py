"""Examples from GSM8K-shaped sources, and their curation into SFT traces.

Sources: ``gsm8k`` (train/test shipped inside tracetune, MIT licence, OpenAI 2021),
``open`` (open-ended prompts written for tracetune, CC0-1.0: a ``train`` split for
GRPO and a held-out ``eval`` split, never mixed),
a local JSONL file, or a Hugging Face dataset id / local dataset folder read with
``datasets``. A row has a question and an answer; the reference is the text after
``#### `` (GSM8K's convention), or the whole answer when there is no marker.

Each row has a task kind (``format.KINDS``): the source's (``load_examples(kind=)``,
config ``data.kind``, numeric by default), or the row's own ``kind`` field. The kind
says what the reference must be::

    numeric  {"question": ..., "answer": "... #### 72"}                  a number
    choice   {"question": ..., "choices": {"A": ..., "B": ...}, "answer": "B"}
             (or "choices": [..., ...], lettered A, B, ... in order)    one of the letters
    text     {"question": ..., "answer": "Paris"}                        non-empty text
    open     {"question": ...}                                           none (judged only;
                                                                         one given is kept)

A choice row's options are rendered into its question (``format.render_choices``),
so every prompt, SFT target and judge sees them the same way. A row's ``id`` field,
when given, names the example; otherwise it is ``<file stem>-<line>``.

Several sources make a mix (config ``data.mix``), each with a weight::

    data:
      mix:
        - {source: gsm8k, weight: 0.5}
        - {source: open, kind: open, weight: 0.5, eval_split: eval}

Each source is loaded on its own (``load_mix``; its errors name its file, line
and field) and held out on its own (``val_fraction``, seed), then the training
examples are drawn into one list by weight (``mixed``): each position's source
with probability weight / sum of weights, a source's examples in a seeded shuffle
that starts again when it runs out, as many in all as the sources hold together.
The seed fixes the order, so a resumed run reads the same list. Ids become
``<short name>/<row id>`` (``gsm8k/train-1``), unique across sources; a row without
a ``domain`` gets the entry's (default: the short name). SFT draws only from the
sources whose rows curate into traces (``curate_mix``: an open source is counted,
not trained on); GRPO draws from every source (``mix_problems``); the harness scores
each source's evaluation split.

Curation turns a GSM8K solution into the trace format::

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.        Step 1: Natalia sold 48/2 = 24 clips in May.
    Natalia sold 48+24 = <<48+24=72>>72 clips ...     ->   Step 2: Natalia sold 48+24 = 72 clips ...
    #### 72                                                Therefore, the answer is 72.  + <answer>72</answer>
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tracetune.arithmetic import CALCULATOR  # GSM8K's "<<48/2=24>>" annotations
from tracetune.files import atomic_path
from tracetune.format import (
    KINDS,
    REASONING_OPEN,
    TAGS,
    build_prompt,
    format_completion,
    normalize_text,
    numbered_steps,
    parse_number,
    render_choices,
    step_text,
)

if TYPE_CHECKING:
    from tracetune.config import DataConfig, MixSource

SHIPPED = {"gsm8k": ("train", "test"), "open": ("train", "eval")}
SYNTHETIC = {  # name -> split -> (seed, count)
    "arithmetic": {"train": (0, 2000), "test": (1, 200)},
    "addition": {"train": (2, 2000), "test": (3, 200)},
    # addition whose training traces stop early half the time (a noisy annotator's
    # "premature conclusion"): SFT on it is right only part of the time, and
    # correctness is what tells the two habits apart. The test split is clean.
    "addition-shortcut": {"train": (4, 2000), "test": (3, 200)},
}


class DataError(ValueError):
    """A row that cannot be used, named by file, line and field."""

    def __init__(self, source: str, line: int | None, field_name: str | None, message: str):
        self.source, self.line, self.field, self.message = source, line, field_name, message
        where = source if line is None else f"{source}:{line}"
        what = f" field '{field_name}':" if field_name else ""
        super().__init__(f"{where}:{what} {message}")


@dataclass(frozen=True)
class Example:
    """One problem of a task ``kind``. ``reference`` is, by kind: the canonical
    number string ("1200", "0.5", "-3"), the option's letter ("B"), the answer text
    ("Paris"), or for an open row "" (or a model answer, kept for judges, never
    checked). ``choices`` are a choice row's (letter, option) pairs, already
    rendered into ``question``. ``domain`` groups rows for per-domain tables (the
    row's ``domain`` field, e.g. "science"; "" when the row has none)."""

    id: str
    question: str
    reference: str
    solution: str = ""
    kind: str = "numeric"
    choices: tuple[tuple[str, str], ...] = ()
    domain: str = ""


@dataclass
class LoadResult:
    examples: list[Example]
    skipped: list[DataError] = field(default_factory=list)


def canonical_number(value: float) -> str:
    """``1200.0`` -> ``"1200"``, ``0.5`` -> ``"0.5"``: how references are written."""
    return str(int(value)) if value == int(value) else repr(value)


def row_kind(row: dict[str, Any], source: str, line: int, default: str = "numeric") -> str:
    """The row's ``kind`` field, else (absent or null, as a table column is where
    unset) the source's ``default``; DataError if unknown."""
    kind = row.get("kind")
    kind = default if kind is None else kind
    if kind not in KINDS:
        raise DataError(source, line, "kind", f"unknown task kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def parse_choices(value: Any, source: str, line: int) -> tuple[tuple[str, str], ...]:
    """A choice row's options as (letter, text) pairs in letter order: from a list
    (lettered A, B, ... in order) or an object letter -> text (letters any case)."""
    if value is None:
        raise DataError(source, line, "choices", "missing: a choice row needs its options")
    if isinstance(value, list):
        if len(value) > len(LETTERS):
            raise DataError(source, line, "choices", f"{len(value)} options; at most {len(LETTERS)}")
        pairs = list(zip(LETTERS, value))
    elif isinstance(value, dict):
        pairs = [(str(key).strip().upper(), text) for key, text in value.items()]
        if bad := [key for key in value if str(key).strip().upper() not in LETTERS or len(str(key).strip()) != 1]:
            raise DataError(source, line, "choices", f"option keys must be single letters A-Z, got {bad[0]!r}")
        if len({letter for letter, _ in pairs}) < len(pairs):
            raise DataError(source, line, "choices", "a letter is given twice (keys differ only in case)")
    else:
        raise DataError(source, line, "choices", f"must be a list of options or an object letter -> option, got {type(value).__name__}")
    if len(pairs) < 2:
        raise DataError(source, line, "choices", f"a choice row needs at least 2 options, got {len(pairs)}")
    for letter, text in pairs:
        if not isinstance(text, str) or not text.strip():
            raise DataError(source, line, "choices", f"option {letter} must be a non-empty string")
    return tuple(sorted((letter, text.strip()) for letter, text in pairs))


def example_from_row(row: Any, source: str, line: int, question_field: str = "question", answer_field: str = "answer",
                     kind: str = "numeric") -> Example:
    """Validate one row of the source's ``kind`` (a row's ``kind`` field overrides
    it); raise DataError naming the field at fault."""
    if not isinstance(row, dict):
        raise DataError(source, line, None, f"expected a JSON object, got {type(row).__name__}")
    kind = row_kind(row, source, line, kind)
    for name in (question_field, answer_field) if kind != "open" else (question_field,):
        if name not in row:
            raise DataError(source, line, name, "missing")
    question, answer = row[question_field], row.get(answer_field)
    if not isinstance(question, str) or not question.strip():
        raise DataError(source, line, question_field, "must be a non-empty string")
    if kind == "open" and answer is None:  # no reference: judged only
        answer = ""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise DataError(source, line, answer_field, f"must be a string, got {type(answer).__name__}")
    solution, marker, final = answer.rpartition("####")
    if not marker:
        solution, final = "", answer
    choices: tuple[tuple[str, str], ...] = ()
    if kind == "numeric":
        number = parse_number(final) if re.fullmatch(r"\s*[-\u2212$]?\s*[0-9][0-9,./]*\s*", final) else None
        if number is None:
            raise DataError(source, line, answer_field, f"reference {final.strip()!r} is not a number (expected '#### <number>')")
        reference = canonical_number(number)
    elif kind == "choice":
        choices = parse_choices(row.get("choices"), source, line)
        reference = final.strip().upper()
        if reference not in dict(choices):
            raise DataError(source, line, answer_field,
                            f"reference {final.strip()!r} is not one of the options' letters ({', '.join(l for l, _ in choices)})")
        question = render_choices(question, choices)
    elif kind == "text":
        reference = final.strip()
        if not normalize_text(reference):
            raise DataError(source, line, answer_field, f"a text row needs a reference with words, got {final.strip()!r}")
    else:
        reference = final.strip()
    domain = row.get("domain")
    if domain is not None and (not isinstance(domain, str) or not domain.strip()):
        raise DataError(source, line, "domain", f"must be a non-empty string, got {domain!r}")
    row_id = row.get("id")
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or not str(row_id).strip()):
        raise DataError(source, line, "id", f"must be a non-empty string or an integer, got {row_id!r}")
    return Example(
        id=str(row_id).strip() if row_id is not None else f"{Path(source).stem}-{line}",
        question=question.strip(),
        reference=reference,
        solution=solution.strip(),
        kind=kind,
        choices=choices,
        domain=domain.strip() if domain is not None else "",
    )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object hook: a key given twice is an error, not last-wins."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    pass


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or DataError) for each non-blank line.

    A malformed line (bad JSON, bytes that are not UTF-8, a key given twice) is
    yielded as its error, so a caller that skips bad rows can go on reading;
    ``read_jsonl`` raises instead. A UTF-8 byte-order mark at the start is accepted.
    A file with no rows at all is an error.
    """
    try:
        handle = Path(path).open("rb")
    except OSError as error:
        raise DataError(str(path), None, None, f"cannot open: {error.strerror}") from None
    rows = 0
    with handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                rows += 1
                yield number, DataError(str(path), number, None, f"not UTF-8 text (byte {error.object[error.start]:#04x} at column {error.start + 1})")
                continue
            if not text.strip():
                continue
            rows += 1
            try:
                yield number, json.loads(text, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as error:
                yield number, DataError(str(path), number, None, f"malformed JSON: {error.msg} (column {error.colno})")
            except _DuplicateKey as error:
                yield number, DataError(str(path), number, str(error), "given twice in one row")
            except RecursionError:
                yield number, DataError(str(path), number, None, "malformed JSON: nested too deeply")
    if not rows:
        raise DataError(str(path), None, None, "the file holds no rows (it is empty)")


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; DataError on bad JSON."""
    for number, value in iter_jsonl(path):
        if isinstance(value, DataError):
            raise value
        yield number, value


def shipped_path(name: str, split: str) -> Path:
    """Path of a split shipped inside the package, e.g. ``shipped_path("gsm8k", "test")``."""
    if split not in SHIPPED[name]:
        raise DataError(name, None, None, f"unknown split {split!r}; shipped splits: {', '.join(SHIPPED[name])}")
    return Path(str(resources.files(f"tracetune.datasets.{name}").joinpath(f"{split}.jsonl")))


def _hf_rows(source: str, split: str) -> Iterator[tuple[int, Any]]:
    try:
        import datasets  # imported here: it is slow to import and rarely needed
    except ImportError:
        raise DataError(source, None, None, "reading Hugging Face datasets needs the 'datasets' package") from None
    try:
        dataset = datasets.load_dataset(source, split=split)
    # datasets raises a dozen exception types for "not found", "offline", "gated"...;
    # whichever it is, the user needs the same sentence, with datasets' reason.
    except Exception as error:  # noqa: BLE001
        raise DataError(
            source, None, None,
            f"cannot load Hugging Face dataset split {split!r}: {error}. "
            "Check the id and the network, or pass a local JSONL file.",
        ) from None
    for index, row in enumerate(dataset, start=1):
        yield index, row


# A tiny two-step word-problem task in GSM8K's format, generated with a fixed seed
# per split: for tests and smoke runs, where a model must learn in minutes.
_NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana")
_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "shells")


def arithmetic_examples(split: str = "train", task: str = "arithmetic") -> list[Example]:
    """Synthetic problems with GSM8K-style solutions and references: "arithmetic" is
    two steps (a + b - c, numbers up to 40), "addition" one step (a + b, digits 1-9),
    "addition-shortcut" the same with half of its training solutions (and labels)
    stopping at the first number.

    >>> arithmetic_examples("test")[0].reference.isdigit()
    True
    """
    if split not in SYNTHETIC[task]:
        raise DataError(task, None, None, f"no split {split!r} (splits: {', '.join(SYNTHETIC[task])})")
    seed, count = SYNTHETIC[task][split]
    rng = random.Random(seed)
    out = []
    for index in range(count):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        if task.startswith("addition"):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have?"
            solution, reference = f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}.", a + b
            if task == "addition-shortcut" and split == "train" and rng.random() < 0.5:
                solution, reference = f"{name} has {a} {item}.", a
        else:
            a, b = rng.randint(2, 40), rng.randint(2, 40)
            c = rng.randint(1, a + b - 1)
            total, left = a + b, a + b - c
            question = f"{name} has {a} {item} and gets {b} more. Then {name} gives away {c}. How many {item} are left?"
            solution = f"{name} has {a} + {b} = <<{a}+{b}={total}>>{total} {item}.\nAfter giving away {c}, {total} - {c} = <<{total}-{c}={left}>>{left} {item} are left."
            reference = left
        out.append(Example(id=f"{task}-{split}-{index}", question=question, reference=str(reference), solution=solution))
    return out

def looks_local(source: str) -> bool:
    """Whether a source names a file rather than a Hugging Face dataset id
    ("owner/name"): a file suffix, an absolute or ./ path, or more than one slash."""
    return (source.endswith((".jsonl", ".json", ".txt", ".csv")) or source.startswith(("/", "./", "../", "~"))
            or source.count("/") > 1 or Path(source).parent.is_dir() and Path(source).parent != Path("."))


def load_examples(
    source: str = "gsm8k",
    split: str = "train",
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    skip_invalid: bool = False,
    limit: int | None = None,
    kind: str = "numeric",
) -> LoadResult:
    """Load and validate examples. Invalid rows raise DataError, or with
    ``skip_invalid`` are skipped and returned in ``LoadResult.skipped``. ``kind``
    is the source's task kind, for rows without a ``kind`` field of their own."""
    if kind not in KINDS:
        raise DataError(source, None, "kind", f"unknown task kind {kind!r}; expected one of {', '.join(KINDS)}")
    if source in SYNTHETIC:
        if kind != "numeric":
            raise DataError(source, None, "kind", f"the synthetic source {source!r} is numeric, not {kind!r}")
        examples = arithmetic_examples(split, source)
        return LoadResult(examples=examples[:limit] if limit is not None else examples)
    if source in SHIPPED:
        name, rows = f"{source}/{split}.jsonl", iter_jsonl(shipped_path(source, split))
    elif Path(source).is_file():
        name, rows = source, iter_jsonl(Path(source))
    elif looks_local(source) and not Path(source).exists():  # a folder goes to datasets.load_dataset
        raise DataError(source, None, None, "no such file (a local path: it is not looked up on the Hugging Face Hub)")
    else:
        name, rows = source, _hf_rows(source, split)

    result = LoadResult(examples=[])
    lines: dict[str, int] = {}  # id -> its line: evaluations are keyed and resumed by id
    for line, row in rows:
        if limit is not None and len(result.examples) >= limit:
            break
        try:
            if isinstance(row, DataError):
                raise row
            example = example_from_row(row, name, line, question_field, answer_field, kind)
            if (first := lines.setdefault(example.id, line)) != line:
                raise DataError(name, line, "id", f"{example.id!r} is already the id of line {first}")
        except DataError as error:
            if not skip_invalid:
                raise
            result.skipped.append(error)
            continue
        result.examples.append(example)
    return result


# ------------------------------------------------------------------------ mixes

T = TypeVar("T")


def short_name(source: str) -> str:
    """A source's name in ids and domains: "gsm8k", a file's stem, a dataset id's last part.

    >>> short_name("gsm8k"), short_name("data/open.jsonl"), short_name("openai/gsm8k")
    ('gsm8k', 'open', 'gsm8k')
    """
    return Path(source.rstrip("/")).stem or source


def mix_names(mix: Sequence[MixSource]) -> list[str]:
    """Each entry's short name; a name that two entries share gets the entry's
    index (``train-0``, ``train-1``), so ids stay unique across sources."""
    names = [short_name(entry.source) for entry in mix]
    return [f"{name}-{index}" if names.count(name) > 1 else name for index, name in enumerate(names)]


def mix_label(mix: Sequence[MixSource]) -> str:
    """A mix in one stable string, for evaluation settings: ``gsm8k+open``."""
    return "+".join(mix_names(mix))


@dataclass
class MixPart:
    """One mix entry's examples, ids ``<name>/<row id>``, every row with a domain."""

    name: str
    weight: float
    examples: list[Example]
    skipped: list[DataError] = field(default_factory=list)


def load_mix(data: DataConfig, role: str = "train", *, eval_split: str = "test", limit: int | None = None,
             skip_invalid: bool = False) -> list[MixPart]:
    """Load every source of ``data.mix``, in mix order, each with ``load_examples``.

    role: "train" reads each entry's ``split``, "eval" its ``eval_split`` (or
    ``eval_split`` here, the harness's). ``limit`` applies to each source. An
    entry's empty kind and field names are data's; a row without a domain gets
    the entry's domain, or its short name.
    """
    if role not in ("train", "eval"):
        raise ValueError(f"role must be 'train' or 'eval', got {role!r}")
    parts = []
    for name, entry in zip(mix_names(data.mix), data.mix):
        loaded = load_examples(entry.source, entry.split if role == "train" else entry.eval_split or eval_split,
                               question_field=entry.question_field or data.question_field,
                               answer_field=entry.answer_field or data.answer_field,
                               skip_invalid=skip_invalid, limit=limit, kind=entry.kind or data.kind)
        domain = entry.domain or name
        examples = [replace(e, id=f"{name}/{e.id}", domain=e.domain or domain) for e in loaded.examples]
        parts.append(MixPart(name, entry.weight, examples, loaded.skipped))
    return parts


def mixed(pools: Sequence[Sequence[T]], weights: Sequence[float], seed: int, length: int | None = None) -> list[T]:
    """``length`` items (default: the pools' sizes summed) drawn from ``pools`` by weight.

    Each position's pool is drawn independently, with probability weight / sum of
    weights; a pool gives its items in a seeded shuffle, shuffled again each time it
    runs out, so a heavy small pool repeats and a light large one is only partly
    seen. The same (pools, weights, seed) always give the same list.

    >>> mixed([["a1", "a2", "a3"], ["b1"]], [3, 1], seed=1)
    ['a2', 'a1', 'a3', 'b1']
    """
    if not pools or len(pools) != len(weights):
        raise ValueError(f"one weight per pool: {len(pools)} pool(s), {len(weights)} weight(s)")
    if empty := [i for i, pool in enumerate(pools) if not pool]:
        raise ValueError(f"pool {empty[0]} is empty: nothing to draw")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"weights must be > 0, got {list(weights)}")
    rng = random.Random(f"mix:{seed}")
    picks = rng.choices(range(len(pools)), weights=weights, k=sum(map(len, pools)) if length is None else length)
    queues: list[list[int]] = [[] for _ in pools]
    out = []
    for pick in picks:
        if not queues[pick]:
            queues[pick] = rng.sample(range(len(pools[pick])), len(pools[pick]))
        out.append(pools[pick][queues[pick].pop()])
    return out


def interleave(lists: Sequence[Sequence[T]]) -> list[T]:
    """Round-robin over ``lists`` (the rest of the longer ones at the end), so that
    the first N of a mix's held-out problems come from every source.

    >>> interleave([[1, 2, 3], ["a"]])
    [1, 'a', 2, 3]
    """
    return [item for row in itertools.zip_longest(*lists, fillvalue=_GAP) for item in row if item is not _GAP]


_GAP = object()


def mix_problems(parts: Sequence[MixPart], val_fraction: float, seed: int,
                 keep: Callable[[Example], bool] | None = None) -> tuple[list[Example], list[Example]]:
    """GRPO's problems from a mix: (training problems drawn by weight, validation problems).

    Each source is held out on its own, as ``split_examples`` holds out a single
    source (so the validation problems are the ones SFT holds out), and the held-out
    parts are interleaved (``interleave``: a validation budget sees every source). ``keep`` (a prompt budget) filters each
    source's training problems before the draw; a source left with none is an error.
    """
    pools, held_out = [], []
    for part in parts:
        train, held = split_examples(part.examples, val_fraction, seed)
        held_out.append(held)
        pools.append([e for e in train if keep is None or keep(e)])
        if not pools[-1]:
            raise DataError(part.name, None, None, f"no training problems left of {len(part.examples)} (after the "
                            "held-out part and the prompt budget): drop it from data.mix or check its rows")
    return mixed(pools, [part.weight for part in parts], seed), interleave(held_out)


# ------------------------------------------------------------------------ curation


NO_REFERENCE = "an open row has no reference answer to train on"  # a drop reason: GRPO-only rows, not a fault


class CurationError(ValueError):
    """Why a solution cannot become a trace (a drop reason, counted and reported)."""


@dataclass(frozen=True)
class Trace:
    """An SFT example: the prompt and the target completion in the trace format."""

    id: str
    question: str
    reference: str
    prompt: str
    completion: str
    n_steps: int
    n_tokens: int | None = None
    kind: str = "numeric"
    choices: tuple[tuple[str, str], ...] = ()
    domain: str = ""

    def example(self) -> Example:
        """The problem this trace answers (to score generations against it)."""
        return Example(self.id, self.question, self.reference, kind=self.kind, choices=self.choices, domain=self.domain)


def solution_steps(solution: str) -> list[str]:
    """The non-empty lines of a GSM8K solution, calculator annotations removed;
    CurationError says why the solution cannot become a trace."""
    cleaned = CALCULATOR.sub("", solution)
    if "<<" in cleaned or ">>" in cleaned:
        raise CurationError("unbalanced calculator annotation")
    if any(tag in solution for tag in TAGS):
        raise CurationError("solution contains trace tags")
    steps = [re.sub(r"\s+", " ", line).strip() for line in cleaned.splitlines()]
    steps = [step for step in steps if step]
    if not steps:
        raise CurationError("no solution steps")
    return steps


def target_completion(steps: Sequence[str], reference: str) -> str:
    """The SFT target: the steps, the recipe's "Therefore, ..." conclusion, the answer."""
    return format_completion(list(steps), f"Therefore, the answer is {reference}.", reference)


def curate_solution(solution: str, reference: str) -> str:
    """A GSM8K solution -> the target completion in the trace format."""
    return target_completion(solution_steps(solution), reference)


def with_loop(completion: str, n_steps: int, after: int, block: int, times: int) -> tuple[str, str, str]:
    """``completion`` with a repetition loop written into it, as (head, loop, tail).

    After step ``after``, its last ``block`` steps are written again ``times`` times,
    numbered on; the true steps follow, renumbered, then the conclusion. SFT skips
    the loop in the loss and trains the tail, so the model learns that what follows
    a repeated step is the next real step: how to leave the greedy loop a small
    model falls into ("Step 9: ... Step 10: <Step 9 again> ...").

    >>> head, loop, tail = with_loop(format_completion(["a = 1", "b = 2"], "Therefore, 2.", "2"), 2, 1, 1, 1)
    >>> loop, tail[:len("Step 3: b = 2")]
    ('Step 2: a = 1\\n', 'Step 3: b = 2')
    """
    if not 1 <= block <= after <= n_steps or times < 1:
        raise ValueError(f"no loop of {block} step(s) after step {after} of {n_steps}")
    lines = completion.removeprefix(REASONING_OPEN).split("\n")
    steps = [step_text(line) for line in lines[:n_steps]]
    numbered = numbered_steps(steps[:after] + steps[after - block : after] * times + steps[after:])
    end = after + block * times
    head = REASONING_OPEN + "\n".join(numbered[:after]) + "\n"
    loop = "\n".join(numbered[after:end]) + "\n"
    tail = "\n".join(numbered[end:] + lines[n_steps:])
    return head, loop, tail


def split_examples(examples: Sequence[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic train/validation split: shuffle with ``seed``, hold out a fraction."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = round(len(examples) * val_fraction)
    held = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in held]
    validation = [e for i, e in enumerate(examples) if i in held]
    return train, validation


def held_out_split(data: DataConfig) -> tuple[list[Example], list[Example]]:
    """(train, validation) problems of ``data.source``'s train split, the validation
    ones held out by ``data.val_fraction`` and ``data.seed``: what GRPO validates on
    and ``tracetune eval --split held-out`` scores, never the test split."""
    loaded = load_examples(data.source, "train", question_field=data.question_field, answer_field=data.answer_field,
                           skip_invalid=data.skip_invalid, kind=data.kind)
    return split_examples(loaded.examples, data.val_fraction, data.seed)


@dataclass
class CurationResult:
    train: list[Trace]
    validation: list[Trace]
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_ids: dict[str, list[str]] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)  # a mix's name -> its traces (train + validation); 0: GRPO only

    def write(self, out_dir: Path) -> dict[str, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for split, traces in (("train", self.train), ("validation", self.validation)):
            path = out_dir / f"{split}.jsonl"
            with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
                for trace in traces:
                    handle.write(json.dumps(asdict(trace), ensure_ascii=False) + "\n")
            paths[split] = path
        return paths


def curate(
    examples: Sequence[Example],
    *,
    val_fraction: float = 0.05,
    seed: int = 42,
    prompt_style: str = "plain",
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int = 1400,
) -> CurationResult:
    """Curate examples into SFT traces with a seeded train/validation split.

    With ``count_tokens`` (a tokenizer), traces whose prompt + completion exceed
    ``max_tokens`` are dropped as "too long"; without one there is no length filter.
    An open row has no reference answer to end a target with: dropped, with its reason.
    """
    train, validation = split_examples(examples, val_fraction, seed)
    result = CurationResult(train=[], validation=[])
    for part, out in ((train, result.train), (validation, result.validation)):
        for example in part:
            try:
                if example.kind == "open":
                    raise CurationError(NO_REFERENCE)
                steps = solution_steps(example.solution)
            except CurationError as error:
                result.dropped[str(error)] += 1
                result.dropped_ids.setdefault(str(error), []).append(example.id)
                continue
            completion = target_completion(steps, example.reference)
            prompt = build_prompt(example.question, prompt_style, example.kind)
            n_tokens = count_tokens(prompt + completion) if count_tokens else None
            if n_tokens is not None and n_tokens > max_tokens:
                reason = f"longer than {max_tokens} tokens"
                result.dropped[reason] += 1
                result.dropped_ids.setdefault(reason, []).append(example.id)
                continue
            out.append(
                Trace(
                    id=example.id,
                    question=example.question,
                    reference=example.reference,
                    prompt=prompt,
                    completion=completion,
                    n_steps=len(steps),
                    n_tokens=n_tokens,
                    kind=example.kind,
                    choices=example.choices,
                    domain=example.domain,
                )
            )
    return result


def curate_mix(parts: Sequence[MixPart], *, val_fraction: float = 0.05, seed: int = 42, prompt_style: str = "plain",
               count_tokens: Callable[[str], int] | None = None, max_tokens: int = 1400) -> CurationResult:
    """``curate`` each source of a mix on its own (its own seeded hold-out), then draw
    the training traces by weight (``mixed``) from the sources that gave any.

    A source whose rows cannot become traces (an open source: no worked solution)
    adds nothing to the draw; its rows are counted in ``dropped`` with their reason
    and ``sources`` gives it 0 traces: GRPO still uses it. Validation traces are
    the sources' held-out ones, interleaved. No trace from any source leaves
    ``train`` empty, for the caller to refuse.
    """
    result = CurationResult(train=[], validation=[])
    pools, weights, held_out = [], [], []
    for part in parts:
        curated = curate(part.examples, val_fraction=val_fraction, seed=seed, prompt_style=prompt_style,
                         count_tokens=count_tokens, max_tokens=max_tokens)
        held_out.append(curated.validation)
        result.dropped.update(curated.dropped)
        for reason, ids in curated.dropped_ids.items():
            result.dropped_ids.setdefault(reason, []).extend(ids)
        result.sources[part.name] = len(curated.train) + len(curated.validation)
        if curated.train:
            pools.append(curated.train)
            weights.append(part.weight)
    result.train = mixed(pools, weights, seed) if pools else []
    result.validation = interleave(held_out)
    return result


def curate_data(data: DataConfig, split: str = "train", *, val_fraction: float | None = None,
                skip_invalid: bool = False, **options: Any) -> tuple[CurationResult, list[DataError], str]:
    """Curate a run's SFT traces as its config says: ``data.source`` alone, or each
    source of ``data.mix`` (``curate_mix``; a mix reads each entry's own split, and
    ``split`` only for a single source). Returns (result, rows skipped as invalid,
    a description of the data for messages). ``options`` go to ``curate``."""
    fraction = data.val_fraction if val_fraction is None else val_fraction
    skip = skip_invalid or data.skip_invalid
    if data.mix:
        parts = load_mix(data, "train", skip_invalid=skip)
        result = curate_mix(parts, val_fraction=fraction, seed=data.seed, prompt_style=data.prompt_style, **options)
        return result, [e for part in parts for e in part.skipped], f"data.mix {mix_label(data.mix)}"
    loaded = load_examples(data.source, split, question_field=data.question_field, answer_field=data.answer_field,
                           skip_invalid=skip, kind=data.kind)
    result = curate(loaded.examples, val_fraction=fraction, seed=data.seed, prompt_style=data.prompt_style, **options)
    return result, loaded.skipped, repr(data.source)


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 90, 99, 100)) -> dict[str, float]:
    """Nearest-rank percentiles, e.g. ``{"p50": ..., "p100": max}``; empty input -> {}."""
    if not values:
        return {}
    ordered = sorted(values)
    return {f"p{q}": ordered[min(len(ordered) - 1, max(0, -(-q * len(ordered) // 100) - 1))] for q in qs}
