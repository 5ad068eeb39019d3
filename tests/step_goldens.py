"""ONE Knowledge Seeding step and ONE dream round on the shared tiny model,
seeds fixed: the setup that tests/test_golden_steps.py pins and that
tools/make_step_goldens.py prints (defined here, once, for both)."""

import jax
import numpy as np

from sleep_jax import dreaming
from sleep_jax import growth
from sleep_jax import rewards
from sleep_jax import seeding
from tiny_models import BASE, teacher_with_fast_knowledge, tiny_cms_model

BOS, EOS, PAD = 1, 2, 0


def _rows(n, width, seed):
  """Random BOS-first rows, right-padded to random lengths >= 4."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, BASE['vocab_size'], (n, width)).astype(np.int32)
  tokens[:, 0] = BOS
  lengths = rng.integers(4, width + 1, n).astype(np.int32)
  for i, length in enumerate(lengths):
    tokens[i, length:] = PAD
  return tokens, lengths


def seeding_step_metrics() -> dict:
  """The metrics of the first step of `seeding.consolidate` (GKD + LTI with
  the exact-match judge) after wake left a level-0 expert."""
  model, params, state = tiny_cms_model()
  params, state = teacher_with_fast_knowledge(params, state)
  tokens, lengths = _rows(8, 12, seed=0)
  cfg = seeding.SeedingConfig(alpha=0.5, lmbda=0.5, gamma=0.5, judge='exact',
                              num_steps=1, batch_size=4, group_size=2,
                              max_new_tokens=6, learning_rate=0.05)
  out = seeding.consolidate(
      model, params, state, level=1,
      replay={'tokens': tokens, 'lengths': lengths}, cfg=cfg,
      rng=jax.random.key(0), bos_id=BOS, eos_id=EOS, pad_id=PAD,
      judge=rewards.ExactJudge(), decode=lambda ids: ' '.join(map(str, ids)))
  return out.metrics[0]


def dream_round_stats() -> dict:
  """Round 0 of `dreaming.rest_em` (generate, select by gradient, evaluate
  every kept dream's isolated copy) on three random contexts, with the sum
  of the accepted rows' tokens (what the round generated and kept)."""
  model, params, state = tiny_cms_model()
  params, state, _ = growth.grow(params, state, 1, jax.random.key(1))
  contexts, context_lengths = _rows(3, 10, seed=1)
  answers, answer_lengths = _rows(3, 8, seed=2)
  # Item 0 of each context asks for its answer row; item 1 is random.
  rng = np.random.default_rng(3)
  inputs = rng.integers(3, BASE['vocab_size'], (3, 2, 8)).astype(np.int32)
  targets = rng.integers(3, BASE['vocab_size'], (3, 2, 8)).astype(np.int32)
  answer_mask = np.zeros((3, 2, 8), np.float32)
  answer_mask[:, 1, 2:4] = 1.0
  for c in range(3):
    n = answer_lengths[c]
    inputs[c, 0], targets[c, 0] = PAD, PAD
    inputs[c, 0, :n - 1] = answers[c, :n - 1]
    targets[c, 0, :n - 1] = answers[c, 1:n]
    answer_mask[c, 0, 1:n - 1] = 1.0
  tasks = dreaming.Tasks(contexts, context_lengths, contexts, context_lengths,
                         {'inputs': inputs, 'targets': targets,
                          'answer_mask': answer_mask})
  cfg = dreaming.DreamingConfig(
      num_dreams=4, max_new_tokens=6, keep_top=1, keep_random=1, eval_steps=3,
      eval_learning_rate=0.05, rounds=0, lora_rank=2, tau='answer_logprob')
  _, rounds, accepted = dreaming.rest_em(
      model, cfg, params, state, tasks, jax.random.key(0), bos_id=BOS,
      eos_id=EOS, pad_id=PAD, host_rng=np.random.default_rng(0))
  return {**rounds[0], 'accepted_rows': int(len(accepted['tokens'])),
          'accepted_token_sum': int(accepted['tokens'].sum())}
