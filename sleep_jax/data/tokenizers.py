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
    """Text of `ids`; specials and ids past the vocabulary (a model's
    embedding table is often padded beyond it) are dropped."""
    specials = {self.bos_id, self.eos_id, self.pad_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in specials
                            and 0 <= int(i) < self.vocab_size])


class HFTokenizer:
  """A `tokenizers` (Hugging Face) tokenizer, from tokenizer.json or GGUF.

  `chat_template` (jinja, as in tokenizer_config.json or GGUF metadata)
  is rendered by `apply_chat_template`.
  """

  def __init__(self, tokenizer, *, bos_id: int | None, eos_id: int,
               pad_id: int | None = None, chat_template: str | None = None):
    self._tok = tokenizer
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = eos_id if pad_id is None else pad_id
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.chat_template = chat_template

  @classmethod
  def from_file(cls, path: str, *, bos_token: str | None = None,
                eos_token: str, chat_template: str | None = None
                ) -> 'HFTokenizer':
    import tokenizers as hf_tokenizers
    tok = hf_tokenizers.Tokenizer.from_file(path)
    bos = None if bos_token is None else tok.token_to_id(bos_token)
    return cls(tok, bos_id=bos, eos_id=tok.token_to_id(eos_token),
               chat_template=chat_template)

  @classmethod
  def from_gguf_bpe(cls, tokens: Sequence[str], merges: Sequence[str],
                    token_types: Sequence[int], *, bos_id: int | None,
                    eos_id: int, pad_id: int | None,
                    chat_template: str | None) -> 'HFTokenizer':
    """A GPT-2-style byte-level BPE from llama.cpp's `tokenizer.ggml.*` keys.

    Token type 3 (control) and 4 (user-defined) become special tokens that
    are matched whole in the text (e.g. `<|im_start|>`). Digits are split
    one by one before byte-level BPE, as the SmolLM/llama-bpe pre-tokenizers
    do.
    """
    import tokenizers as hf_tokenizers
    from tokenizers import decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(' ', 1)) for m in merges]
    tok = hf_tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs,
                                             fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    specials = [hf_tokenizers.AddedToken(t, special=True, normalized=False)
                for t, kind in zip(tokens, token_types) if kind in (3, 4)]
    tok.add_special_tokens(specials)
    return cls(tok, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
               chat_template=chat_template)

  def encode(self, text: str, *, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    bos = [self.bos_id] if add_bos and self.bos_id is not None else []
    return bos + ids + ([self.eos_id] if add_eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def apply_chat_template(self, messages: Sequence[dict],
                          add_generation_prompt: bool = True) -> str:
    if not self.chat_template:
      raise ValueError('This tokenizer has no chat template.')
    import jinja2
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt)


# Pre-tokenizer regexes and special-token layouts of the published
# tokenizers (from Meta's llama-models and Alibaba's Qwen releases).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
                   r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPECIALS = ('<|begin_of_text|>', '<|end_of_text|>',
                    '<|reserved_special_token_0|>', '<|reserved_special_token_1|>',
                    '<|finetune_right_pad_id|>', '<|step_id|>',
                    '<|start_header_id|>', '<|end_header_id|>', '<|eom_id|>',
                    '<|eot_id|>', '<|python_tag|>', '<|image|>')


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
  """A tiktoken rank file: one `base64(token) rank` per line."""
  import base64
  ranks = {}
  with open(path, 'rb') as f:
    for line in f:
      if line.strip():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
  return ranks


class TiktokenTokenizer:
  """A tiktoken BPE (Llama 3, Qwen) from a local rank file."""

  def __init__(self, name: str, ranks_path: str, pattern: str,
               specials: dict[str, int], *, bos: str | None, eos: str,
               pad: str | None = None):
    import tiktoken
    self._enc = tiktoken.Encoding(name, pat_str=pattern,
                                  mergeable_ranks=_read_tiktoken_ranks(ranks_path),
                                  special_tokens=specials)
    self.special_tokens = dict(specials)
    self.bos_id = None if bos is None else specials[bos]
    self.eos_id = specials[eos]
    self.pad_id = specials[pad] if pad else self.eos_id
    self.vocab_size = self._enc.n_vocab

  @classmethod
  def llama3(cls, path: str) -> 'TiktokenTokenizer':
    """Llama 3 from `llama_models/llama3/tokenizer.model`."""
    base = 128_000
    names = list(_LLAMA3_SPECIALS) + [
        f'<|reserved_special_token_{i}|>' for i in range(2, 256 - 10)]
    specials = {n: base + i for i, n in enumerate(names)}
    return cls('llama3', path, _LLAMA3_PATTERN, specials,
               bos='<|begin_of_text|>', eos='<|end_of_text|>',
               pad='<|finetune_right_pad_id|>')

  @classmethod
  def qwen(cls, path: str) -> 'TiktokenTokenizer':
    """Qwen (1, 2, 2.5 share the vocabulary) from `qwen.tiktoken`."""
    names = ['<|endoftext|>', '<|im_start|>', '<|im_end|>'] + [
        f'<|extra_{i}|>' for i in range(205)]
    specials = {n: 151_643 + i for i, n in enumerate(names)}
    return cls('qwen', path, _QWEN_PATTERN, specials, bos=None,
               eos='<|endoftext|>')

  def encode(self, text: str, *, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    ids = self._enc.encode(text, allowed_special='all')
    bos = [self.bos_id] if add_bos and self.bos_id is not None else []
    return bos + ids + ([self.eos_id] if add_eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    specials = set(self.special_tokens.values())
    return self._enc.decode([int(i) for i in ids if int(i) not in specials])


class CharTokenizer:
  """One id per character of a fixed `alphabet` (after pad 0, bos 1, eos 2).

  For grid tasks (ARC), where a learned vocabulary would merge digits of
  neighbouring cells: every cell is exactly one token.
  """

  def __init__(self, alphabet: str):
    if len(set(alphabet)) != len(alphabet):
      raise ValueError(f'CharTokenizer alphabet {alphabet!r} repeats a '
                       'character; list each once.')
    self.alphabet = alphabet
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
    self._ids = {c: i + 3 for i, c in enumerate(alphabet)}
    self.vocab_size = len(alphabet) + 3

  def encode(self, text: str, *, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    try:
      ids = [self._ids[c] for c in text]
    except KeyError as e:
      raise ValueError(f'character {e.args[0]!r} is not in the CharTokenizer '
                       f'alphabet {self.alphabet!r}.') from None
    return ([self.bos_id] if add_bos else []) + ids + (
        [self.eos_id] if add_eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; specials and ids outside the alphabet are dropped."""
    return ''.join(self.alphabet[int(i) - 3] for i in ids
                   if 3 <= int(i) < self.vocab_size)
