"""What the dreaming tests share: the model, random rows, items, tasks."""

import jax
import numpy as np

from sleep_jax import dreaming
from sleep_jax import growth
from tiny_models import tiny_cms_model

BOS, EOS, PAD = 1, 2, 0
V, D = 37, 32


def make_model(tie_embeddings=True):
  """(model, params, model_state, slot): tiny_models.tiny_cms_model() with V
  tokens and a level-1 expert grown in `slot` (B = 0)."""
  model, params, var = tiny_cms_model(vocab_size=V, d_model=D,
                                      tie_embeddings=tie_embeddings)
  params, var, slot = growth.grow(params, var, 1, jax.random.key(1))
  return model, params, var, slot


CFG = dreaming.DreamingConfig(
    num_dreams=4, max_new_tokens=6, keep_top=1, keep_random=1, eval_steps=3,
    eval_learning_rate=0.05, rounds=1, rest_steps=2, rest_batch_size=2,
    rehearse_steps=3, rehearse_batch_size=2, lora_rank=2, tau='answer_logprob')


def random_rows(n, width, seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, V, (n, width)).astype(np.int32)
  tokens[:, 0] = BOS
  lengths = rng.integers(4, width + 1, n).astype(np.int32)
  for i, length in enumerate(lengths):
    tokens[i, length:] = PAD
  return tokens, lengths


def items_about(dreams, lengths, n_items, seed):
  """Per row: item 0 asks for the dream's tokens (a prefix of it as prompt,
  the rest as answer); the others are random."""
  rng = np.random.default_rng(seed)
  n, width = dreams.shape
  inputs = rng.integers(3, V, (n, n_items, width)).astype(np.int32)
  targets = rng.integers(3, V, (n, n_items, width)).astype(np.int32)
  answer = np.zeros((n, n_items, width), np.float32)
  answer[:, :, 2:4] = 1.0
  for i in range(n):
    row = np.concatenate([[BOS], dreams[i, :lengths[i]]])
    inputs[i, 0, :] = PAD
    targets[i, 0, :] = PAD
    answer[i, 0, :] = 0.0
    inputs[i, 0, :len(row) - 1] = row[:-1]
    targets[i, 0, :len(row) - 1] = row[1:]
    answer[i, 0, 1:len(row) - 1] = 1.0
  return {'inputs': inputs, 'targets': targets, 'answer_mask': answer}


def make_tasks(num_contexts=3, seed=0):
  prompts, lengths = random_rows(num_contexts, 10, seed)
  dreams, dlen = random_rows(num_contexts, 8, seed + 1)
  return dreaming.Tasks(prompts, lengths, prompts, lengths,
                        items_about(dreams[:, 1:], dlen - 1, 2, seed))
