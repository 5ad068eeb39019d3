"""What the Knowledge Seeding tests share: the model, replay rows, configs."""

import dataclasses

import jax
import numpy as np

from sleep_jax import rewards
from sleep_jax import seeding
from sleep_jax import sharding
from tiny_models import FAST_LEVEL, SLOW_LEVEL, tiny_cms_model

RULES = sharding.DEFAULT_RULES
BOS, EOS, PAD = 1, 2, 0


def make_model(num_kv_heads=2, slow_top_k=2):
  """tiny_models.tiny_cms_model(), with other kv heads or slow-level top-k."""
  return tiny_cms_model(num_kv_heads=num_kv_heads, cms_levels=[
      FAST_LEVEL, dict(SLOW_LEVEL, top_k=slow_top_k)])


def replay_rows(n=8, width=12, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 40, (n, width)).astype(np.int32)
  tokens[:, 0] = BOS
  lengths = rng.integers(4, width + 1, n).astype(np.int32)
  for i, length in enumerate(lengths):
    tokens[i, length:] = PAD
  return {'tokens': tokens, 'lengths': lengths}


def digits(ids):
  return ' '.join(map(str, ids))


CFG = seeding.SeedingConfig(alpha=0.5, lmbda=0.5, gamma=0.5, judge='exact',
                            num_steps=3, batch_size=4, group_size=2,
                            max_new_tokens=6, learning_rate=0.05)
ANCHORED = dataclasses.replace(CFG, anchor_weight=1.0, anchor_batch_size=4,
                               anchor_max_new_tokens=5)


def run_consolidate(model, params, state, cfg=CFG, mesh=None, seed=0,
                    **kwargs):
  return seeding.consolidate(
      model, params, state, level=1, replay=replay_rows(), cfg=cfg,
      rng=jax.random.key(seed), bos_id=BOS, eos_id=EOS, pad_id=PAD,
      judge=rewards.ExactJudge(), decode=digits, mesh=mesh, **kwargs)
