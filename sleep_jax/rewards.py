"""Rewards for Learning to Imitate (DESIGN §4.2-4.3).

* `edit_distance` / `levenshtein_reward`: token-level Levenshtein distance as
  a vectorised JAX dynamic program, and the thresholded reward

      r_abs = 1 - z / max(|pred|, |ref|)  if z <= z0,  else 0

  (two empty sequences are identical: r_abs = 1).
  Why JAX and not a host library: the LTI rollouts are already on the
  device as padded [batch, length] arrays, and one jitted program scores all
  B*G pairs at once without a device->host copy and a Python loop over rows;
  `python -m benchmarks.levenshtein` measures it against rapidfuzz (see
  README, "Knowledge Seeding").
  The program runs one `lax.scan` step per prediction token; each step fills
  a whole DP row at once, because the row recurrence

      d[i][j] = min(d[i-1][j] + 1, d[i-1][j-1] + cost, d[i][j-1] + 1)

  has the closed form d[i][j] = j + cummin_k<=j (t[k] - k), with t[k] the
  row's first two terms (t[0] = i).
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

from sleep_jax.models import transformer

JUDGES = ('embedding', 'exact', 'teacher')


# ------------------------------------------------------------ Levenshtein ---


def _distance_one(pred_N, pred_len, ref_M, ref_len):
  cols = jnp.arange(ref_M.shape[0] + 1, dtype=jnp.int32)

  def row(prev, inputs):
    i, token = inputs
    cost = (ref_M != token).astype(jnp.int32)
    diag_or_up = jnp.minimum(prev[1:] + 1, prev[:-1] + cost)
    t = jnp.concatenate([i[None], diag_or_up])
    cur = cols + jax.lax.cummin(t - cols)
    # Rows past the prediction's length leave the table as it was.
    return jnp.where(i <= pred_len, cur, prev), None

  rows = jnp.arange(1, pred_N.shape[0] + 1, dtype=jnp.int32)
  last, _ = jax.lax.scan(row, cols, (rows, pred_N))
  return last[ref_len]


@jax.jit
def edit_distance(pred_BxN, pred_len_B, ref_BxM, ref_len_B):
  """Levenshtein distances between token rows (padding past the lengths)."""
  return jax.vmap(_distance_one)(
      jnp.asarray(pred_BxN, jnp.int32), jnp.asarray(pred_len_B, jnp.int32),
      jnp.asarray(ref_BxM, jnp.int32), jnp.asarray(ref_len_B, jnp.int32))


@jax.jit
def _reward_from_distance(distance_B, pred_len_B, ref_len_B, z0):
  longest = jnp.maximum(pred_len_B, ref_len_B)
  similarity = 1.0 - distance_B / jnp.maximum(longest, 1)
  return jnp.where(distance_B <= z0, similarity, 0.0).astype(jnp.float32)


def levenshtein_reward(pred, ref, *, z0, pred_lengths=None, ref_lengths=None):
  """r_abs of DESIGN §4.2 on token sequences.

  Either two 1-D token sequences (lists or arrays; returns a float), or two
  padded batches int[B, N] and int[B, M] with `pred_lengths` / `ref_lengths`
  (returns float32[B]). `z0` is the largest edit distance that still earns
  a reward.
  """
  if z0 < 0:
    raise ValueError(f'z0={z0} must be >= 0 (an edit-distance threshold).')
  single = pred_lengths is None and ref_lengths is None
  if single:
    pred, ref = np.asarray(pred, np.int32), np.asarray(ref, np.int32)
    if pred.ndim != 1 or ref.ndim != 1:
      raise ValueError('levenshtein_reward: without lengths, pred and ref must '
                       f'be 1-D token sequences; got shapes {pred.shape} and '
                       f'{ref.shape}.')
    pred_lengths, ref_lengths = [pred.size], [ref.size]
    # One padding slot keeps empty sequences well-formed arrays.
    pred = np.pad(pred, (0, 1))[None]
    ref = np.pad(ref, (0, 1))[None]
  elif pred_lengths is None or ref_lengths is None:
    raise ValueError('levenshtein_reward: give both pred_lengths and '
                     'ref_lengths for padded batches, or neither.')
  distance = edit_distance(pred, pred_lengths, ref, ref_lengths)
  reward = _reward_from_distance(distance, jnp.asarray(pred_lengths),
                                 jnp.asarray(ref_lengths), z0)
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
