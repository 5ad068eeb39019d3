"""LTI rewards (docs/design.md §4.2-4.3): edit distance, semantic judges."""

import numpy as np
import pytest

from sleep_jax import rewards
from tiny_models import tiny_dense_model


def reference_distance(a, b):
  """Textbook Wagner-Fischer table, written independently of the library."""
  table = np.zeros((len(a) + 1, len(b) + 1), int)
  table[:, 0] = np.arange(len(a) + 1)
  table[0, :] = np.arange(len(b) + 1)
  for i in range(1, len(a) + 1):
    for j in range(1, len(b) + 1):
      table[i, j] = min(table[i - 1, j] + 1, table[i, j - 1] + 1,
                        table[i - 1, j - 1] + (a[i - 1] != b[j - 1]))
  return table[-1, -1]


def reference_reward(a, b, z0):
  z = reference_distance(a, b)
  return 0.0 if z > z0 else 1.0 - z / max(len(a), len(b), 1)


def test_levenshtein_reward_matches_reference_on_random_batches():
  rng = np.random.default_rng(0)
  batch, width = 300, 10
  pred = rng.integers(0, 4, (batch, width))
  ref = rng.integers(0, 4, (batch, width))
  pred_len = rng.integers(0, width + 1, batch)   # empty rows included
  ref_len = rng.integers(0, width + 1, batch)
  for z0 in (0, 3, 6, 100):
    got = rewards.levenshtein_reward(pred, ref, z0=z0, pred_lengths=pred_len,
                                     ref_lengths=ref_len)
    want = [reference_reward(pred[b, :pred_len[b]].tolist(),
                             ref[b, :ref_len[b]].tolist(), z0)
            for b in range(batch)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
  assert (pred_len == 0).any() and (ref_len == 0).any()


def test_levenshtein_reward_threshold_edge_and_empty_sequences():
  pred, ref = [5, 6, 7, 8], [5, 9, 7]          # distance 2, longest 4
  assert rewards.levenshtein_reward(pred, ref, z0=2) == pytest.approx(0.5)
  assert rewards.levenshtein_reward(pred, ref, z0=1.99) == 0.0
  assert rewards.levenshtein_reward([], [], z0=0) == 1.0
  assert rewards.levenshtein_reward([], [1, 2], z0=2) == 0.0   # 1 - 2/2
  assert rewards.levenshtein_reward([], [1, 2], z0=1) == 0.0
  assert rewards.levenshtein_reward([3], [], z0=5) == 0.0
  assert rewards.levenshtein_reward([1, 2, 3], [1, 2, 3], z0=0) == 1.0
  with pytest.raises(ValueError, match=r'z0=-1 must be >= 0'):
    rewards.levenshtein_reward([1], [1], z0=-1)


def test_exact_judge_normalises_case_space_and_punctuation():
  judge = rewards.make_judge('exact')
  same = judge.same_meaning(['Bob lives in  Aldport.', 'a cat', 'x'],
                            ['bob lives in aldport', 'A cat!', 'y'])
  np.testing.assert_array_equal(same, [True, True, False])
  with pytest.raises(ValueError, match='compared in pairs'):
    judge.same_meaning(['a'], [])


def test_embedding_judge_separates_paraphrases():
  judge = rewards.make_judge('embedding', threshold=0.8)
  same = judge.same_meaning(
      ['A man is playing a guitar.', 'The cat sleeps on the sofa.'],
      ['A man plays the guitar.', 'Stock markets fell sharply today.'])
  np.testing.assert_array_equal(same, [True, False])


class _CharTokenizer:
  pad_id = 0

  def encode(self, text, add_bos=False):
    return [1] * add_bos + [2 + ord(c) % 60 for c in text]


def test_teacher_judge_uses_hidden_state_cosine():
  model, params, _ = tiny_dense_model(vocab_size=64, num_layers=1, max_len=32)
  judge = rewards.make_judge('teacher', teacher=(model, params, {}),
                             tokenizer=_CharTokenizer(), threshold=0.999)
  emb = judge.embed(['hello there', 'hello there', 'zzzzqqq'])
  np.testing.assert_allclose(emb[0], emb[1], rtol=1e-6)
  np.testing.assert_array_equal(
      judge.same_meaning(['hello there', 'hello there'],
                         ['hello there', 'zzzzqqq']), [True, False])
  with pytest.raises(ValueError, match="judge 'teacher' needs"):
    rewards.make_judge('teacher')
  with pytest.raises(ValueError, match="Unknown semantic judge 'oracle'"):
    rewards.make_judge('oracle')
