"""Rewards for Learning to Imitate (docs/design.md §4.2-4.3).

* `levenshtein_reward`: token-level Levenshtein distance and the thresholded
  reward

      r_abs = 1 - z / max(|pred|, |ref|)  if z <= z0,  else 0

  (two empty sequences are identical: r_abs = 1). The distance is
  rapidfuzz's C++ Levenshtein on the host. We also wrote a vectorised JAX
  dynamic program (one jitted program for all B*G pairs, no device->host
  copy); `python -m benchmarks.levenshtein` keeps it and measures both side
  by side: on a 2-core CPU rapidfuzz, copy included, was 4-38x faster at the
  sizes LTI uses (64-1024 pairs of 16-64 tokens; README, "Knowledge
  Seeding"), so the library uses rapidfuzz. The rewards feed host-side
  judges and advantages anyway.
* Semantic judges behind one interface, `same_meaning(a_texts, b_texts) ->
  bool[N]`: `EmbeddingJudge` (all-MiniLM-L6-v2 run in JAX, cosine >=
  threshold), `ExactJudge` (normalised string equality) and `TeacherJudge`
  (cosine of the frozen teacher's mean final hidden states; no extra
  weights). `make_judge(name, ...)` builds one by name.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from rapidfuzz.distance import Levenshtein

from sleep_jax.models import transformer

JUDGES = ('embedding', 'exact', 'teacher')


# ------------------------------------------------------------ Levenshtein ---


def _rows(tokens, lengths) -> list[list[int]]:
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  return [tokens[b, :lengths[b]].tolist() for b in range(len(lengths))]


def levenshtein_reward(pred, ref, *, z0, pred_lengths=None, ref_lengths=None):
  """r_abs of docs/design.md §4.2 on token sequences.

  Either two 1-D token sequences (lists or arrays; returns a float), or two
  padded batches int[B, N] and int[B, M] with `pred_lengths` / `ref_lengths`
  (returns float32[B]). `z0` is the largest edit distance that still earns
  a reward.
  """
  if z0 < 0:
    raise ValueError(f'z0={z0} must be >= 0 (an edit-distance threshold).')
  single = pred_lengths is None and ref_lengths is None
  if single:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.ndim != 1 or ref.ndim != 1:
      raise ValueError('levenshtein_reward: without lengths, pred and ref must '
                       f'be 1-D token sequences; got shapes {pred.shape} and '
                       f'{ref.shape}.')
    preds, refs = [pred.tolist()], [ref.tolist()]
  elif pred_lengths is None or ref_lengths is None:
    raise ValueError('levenshtein_reward: give both pred_lengths and '
                     'ref_lengths for padded batches, or neither.')
  else:
    preds, refs = _rows(pred, pred_lengths), _rows(ref, ref_lengths)
  reward = np.zeros((len(preds),), np.float32)
  for i, (p, r) in enumerate(zip(preds, refs)):
    distance = Levenshtein.distance(p, r)
    if distance <= z0:
      reward[i] = 1.0 - distance / max(len(p), len(r), 1)
  return float(reward[0]) if single else reward


# ----------------------------------------------------------------- judges ---


class SemanticJudge(Protocol):
  def same_meaning(self, a_texts: Sequence[str], b_texts: Sequence[str]
                   ) -> np.ndarray:
    ...


def _check_pairs(a_texts, b_texts):
  if len(a_texts) != len(b_texts):
    raise ValueError(f'same_meaning: got {len(a_texts)} texts and '
                     f'{len(b_texts)} references; they are compared in pairs.')


def _cosine(a_NxD, b_NxD):
  a = a_NxD / np.maximum(np.linalg.norm(a_NxD, axis=-1, keepdims=True), 1e-12)
  b = b_NxD / np.maximum(np.linalg.norm(b_NxD, axis=-1, keepdims=True), 1e-12)
  return np.sum(a * b, axis=-1)


class ExactJudge:
  """Same meaning = equal after lower-casing and dropping punctuation."""

  @staticmethod
  def normalise(text: str) -> str:
    return ' '.join(re.sub(r'[^\w\s]', ' ', text.lower()).split())

  def same_meaning(self, a_texts, b_texts) -> np.ndarray:
    _check_pairs(a_texts, b_texts)
    return np.array([self.normalise(a) == self.normalise(b)
                     for a, b in zip(a_texts, b_texts)], bool)


class EmbeddingJudge:
  """all-MiniLM-L6-v2 sentence embeddings (JAX); same if cosine >= threshold."""

  def __init__(self, encoder=None, threshold: float = 0.8):
    if encoder is None:
      from sleep_jax.models import bert  # loads weights: only when used.
      encoder = bert.SentenceEncoder.from_asset()
    self.encoder = encoder
    self.threshold = float(threshold)

  def same_meaning(self, a_texts, b_texts) -> np.ndarray:
    _check_pairs(a_texts, b_texts)
    if not len(a_texts):
      return np.zeros((0,), bool)
    return np.asarray(self.encoder.cosine(list(a_texts), list(b_texts))
                      ) >= self.threshold


class TeacherJudge:
  """Cosine of the frozen teacher's mean-pooled final hidden states."""

  def __init__(self, model, params, model_state, tokenizer,
               threshold: float = 0.9, length: int | None = None):
    self.model, self.params, self.model_state = model, params, model_state
    self.tokenizer = tokenizer
    self.threshold = float(threshold)
    self.length = length or model.config.max_len

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    rows = [self.tokenizer.encode(t, add_bos=True)[:self.length] for t in texts]
    tokens = np.full((len(rows), self.length), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), self.length), np.float32)
    for i, row in enumerate(rows):
      tokens[i, :len(row)], mask[i, :len(row)] = row, 1.0
    return np.asarray(_mean_hidden(self.model, self.params, self.model_state,
                                   tokens, mask))

  def same_meaning(self, a_texts, b_texts) -> np.ndarray:
    _check_pairs(a_texts, b_texts)
    if not len(a_texts):
      return np.zeros((0,), bool)
    return _cosine(self.embed(a_texts), self.embed(b_texts)) >= self.threshold


@functools.partial(jax.jit, static_argnums=0)
def _mean_hidden(model, params, model_state, tokens_BxL, mask_BxL):
  _, captured = model.apply(
      transformer.variables(params, model_state), tokens_BxL,
      capture_intermediates=lambda module, _: module.name == 'final_norm',
      mutable=['intermediates'])
  hidden_BxLxD = captured['intermediates']['final_norm']['__call__'][0]
  weights = mask_BxL[..., None]
  return jnp.sum(hidden_BxLxD * weights, 1) / jnp.maximum(weights.sum(1), 1.0)


def make_judge(name: str, *, threshold: float | None = None,
               teacher: tuple | None = None, tokenizer=None,
               encoder=None) -> SemanticJudge:
  """A judge by name; `teacher=(model, params, model_state)` for 'teacher'."""
  if name == 'exact':
    return ExactJudge()
  if name == 'embedding':
    return EmbeddingJudge(encoder, 0.8 if threshold is None else threshold)
  if name == 'teacher':
    if teacher is None or tokenizer is None:
      raise ValueError("judge 'teacher' needs teacher=(model, params, "
                       'model_state) and the tokenizer.')
    return TeacherJudge(*teacher, tokenizer,
                        0.9 if threshold is None else threshold)
  raise ValueError(f'Unknown semantic judge {name!r}; valid: {list(JUDGES)}.')


def decode_rows(decode: Callable[[list[int]], str], tokens_BxN, lengths_B
                ) -> list[str]:
  """Texts of padded token rows (each cut at its length)."""
  tokens, lengths = np.asarray(tokens_BxN), np.asarray(lengths_B)
  return [decode(tokens[b, :lengths[b]].tolist()) for b in range(len(lengths))]
