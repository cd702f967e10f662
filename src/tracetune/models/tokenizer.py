"""The tokenizer every tracetune model uses: a SentencePiece model plus Gemma's
chat control tokens.

SentencePiece never produces control pieces such as ``<start_of_turn>`` from text
(TUNIX_NOTES), so ``encode`` splits the text at them and inserts their ids.
``token_texts`` decodes incrementally, so the pieces concatenate exactly to the
decoded completion: the confidence reward relies on that to find answer tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

CONTROL_PIECES = ("<start_of_turn>", "<end_of_turn>")


class Tokenizer:
    """SentencePiece with Gemma's conventions: BOS prepended, EOS and
    ``<end_of_turn>`` end a generation, id 0 is padding."""

    def __init__(self, proto: bytes):
        self.proto = proto
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(proto)
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = max(self.sp.pad_id(), 0)
        # Control pieces this vocabulary has (the tiny test vocabulary has them too).
        self.control_ids = {
            piece: self.sp.PieceToId(piece)
            for piece in CONTROL_PIECES
            if self.sp.PieceToId(piece) != self.sp.unk_id()
        }
        self._control_split = (
            re.compile("(" + "|".join(map(re.escape, self.control_ids)) + ")") if self.control_ids else None
        )

    @classmethod
    def from_file(cls, path: Path) -> Tokenizer:
        return cls(Path(path).read_bytes())

    def save(self, path: Path) -> None:
        Path(path).write_bytes(self.proto)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end a generation: EOS, and ``<end_of_turn>`` for chat models."""
        end_of_turn = self.control_ids.get("<end_of_turn>")
        return (self.eos_id,) if end_of_turn is None else (self.eos_id, end_of_turn)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of ``text``, control pieces included, with BOS first by default.

        >>> tok.encode("The capital of France is")  # doctest: +SKIP
        [2, 818, 5279, 529, 7001, 563]
        """
        ids = [self.bos_id] if add_bos else []
        parts = self._control_split.split(text) if self._control_split else [text]
        for part in parts:
            if part in self.control_ids:
                ids.append(self.control_ids[part])
            elif part:
                ids.extend(self.sp.EncodeAsIds(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; padding, BOS and EOS are dropped."""
        skip = {self.pad_id, self.bos_id, self.eos_id}
        return self.sp.DecodeIds([int(i) for i in ids if int(i) not in skip])

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's share of the decoded text, so that ``"".join`` equals
        ``decode(ids)``. A byte-fallback token that ends mid-character gets "" and
        the token completing the character carries it."""
        texts, previous = [], ""
        ids = [int(i) for i in ids]
        for n in range(1, len(ids) + 1):
            current = self.decode(ids[:n])
            # A partial UTF-8 sequence decodes to U+FFFD until it is complete.
            if current.endswith("\ufffd") and n < len(ids):
                texts.append("")
                continue
            texts.append(current[len(previous) :] if current.startswith(previous) else current)
            previous = current
        return texts
