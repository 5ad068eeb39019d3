"""Knowledge Seeding's rollouts (sleep_jax.seeding_rollouts): prompts, LTI
advantages, the anchor's completions. (GKD/LTI rollouts are checked through
the KS step in test_seeding.py.)"""

import dataclasses

import jax
import numpy as np

from sleep_jax import seeding_rollouts
from seeding_setup import ANCHORED, BOS, EOS, PAD, replay_rows


def test_group_advantages_subtract_group_mean():
  r = np.array([[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]])
  adv = seeding_rollouts.group_advantages(r, normalize=False)
  np.testing.assert_allclose(adv, [[0.5, -0.5, 0, 0], [0, 0, 0, 0]], atol=1e-7)
  norm = seeding_rollouts.group_advantages(r, normalize=True)
  np.testing.assert_allclose(norm[0], adv[0] / (r[0].std() + 1e-6), rtol=1e-6)


def test_anchor_prompts_are_earlier_rows_prefixes_else_bos(tiny_cms):
  rows = replay_rows(n=5, seed=3)
  cfg = dataclasses.replace(ANCHORED, anchor_prompts='replay',
                            anchor_batch_size=32, min_prompt_tokens=2)
  prompts, lengths = seeding_rollouts.draw_anchor_prompts(
      rows, cfg, np.random.default_rng(0), BOS, PAD)
  assert prompts.shape == (32, rows['tokens'].shape[1])
  used = set()
  for row, n in zip(prompts, lengths):
    assert n >= 2 and np.all(row[n:] == PAD)
    match = [i for i, (r, length) in enumerate(zip(rows['tokens'],
                                                   rows['lengths']))
             if np.array_equal(row[:n], r[:n]) and n < length]
    assert match, row
    used.update(match)
  assert len(used) > 1
  empty = {'tokens': np.zeros((0, 12), np.int32),
           'lengths': np.zeros((0,), np.int32)}
  for earlier, c in ((None, cfg), (empty, cfg),
                     (rows, dataclasses.replace(cfg, anchor_prompts='bos'))):
    bos, ones = seeding_rollouts.draw_anchor_prompts(
        earlier, c, np.random.default_rng(0), BOS, PAD)
    np.testing.assert_array_equal(bos, np.full((32, 1), BOS))
    np.testing.assert_array_equal(ones, 1)
  # The anchor's rows are prompt ++ its completion; the loss covers the
  # completion only.
  model, params, state = tiny_cms
  out = seeding_rollouts.anchor_rollout(
      model, cfg, (params, state), prompts[:4], lengths[:4], jax.random.key(0),
      eos_id=EOS, pad_id=PAD)
  tokens = np.asarray(out['anchor_tokens'])
  mask = np.asarray(out['anchor_mask'])
  assert tokens.shape == (4, prompts.shape[1] + cfg.anchor_max_new_tokens)
  for b, n in enumerate(lengths[:4]):
    np.testing.assert_array_equal(tokens[b, :n], prompts[b, :n])
    assert mask[b, :n - 1].sum() == 0 and mask[b, n - 1] == 1
