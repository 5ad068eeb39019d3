"""Tokenizers behind one small interface.

Every tokenizer has `encode(text, *, add_bos, add_eos) -> list[int]`,
`decode(ids) -> str`, `bos_id`, `eos_id`, `pad_id`, `vocab_size`.
`SentencePieceTokenizer` is the one tiny models train offline on their own
corpus; its model file is saved next to the checkpoint (`tokenizer.model`).
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Protocol, Sequence

import sentencepiece as spm

TOKENIZER_FILENAME = 'tokenizer.model'


class Tokenizer(Protocol):
  bos_id: int
  eos_id: int
  pad_id: int
  vocab_size: int

  def encode(self, text: str, *, add_bos: bool = False,
             add_eos: bool = False) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
  """A SentencePiece model (BPE with byte fallback, so no text is unknown)."""

  def __init__(self, model_proto: bytes):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id()
    self.vocab_size = self._sp.get_piece_size()

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> 'SentencePieceTokenizer':
    """Trains a BPE model on `texts`. Deterministic (one thread)."""
    # 256 byte-fallback pieces + 4 specials must fit.
    if vocab_size < 300:
      raise ValueError(f'tokenizer vocab_size={vocab_size} is too small: byte '
                       'fallback needs 260 ids; use >= 300.')
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model,
        vocab_size=vocab_size, model_type='bpe', character_coverage=1.0,
        byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        num_threads=1, minloglevel=2, hard_vocab_limit=False,
        max_sentence_length=1 << 16)
    return cls(model.getvalue())

  @classmethod
  def load(cls, path: str) -> 'SentencePieceTokenizer':
    with open(path, 'rb') as f:
      return cls(f.read())

  def save(self, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
      f.write(self._proto)
    os.replace(tmp, path)

  def encode(self, text: str, *, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    ids = self._sp.encode(text)
    return ([self.bos_id] if add_bos else []) + ids + (
        [self.eos_id] if add_eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    specials = {self.bos_id, self.eos_id, self.pad_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in specials])
