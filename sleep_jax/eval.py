"""Closed-book evaluation: does the model complete a prompt with the answer?

An item is (prompt, answer) text. It counts as recalled when, fed
`BOS + prompt + answer`, the model's argmax at every answer position is the
answer's next token — the same as greedy decoding producing the answer.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.models import transformer


def encode_items(tokenizer, items: Sequence[tuple[str, str]], length: int
                 ) -> dict[str, np.ndarray]:
  """Right-padded arrays: inputs [N, length], targets, answer mask."""
  n = len(items)
  inputs = np.full((n, length), tokenizer.pad_id, np.int32)
  targets = np.full((n, length), tokenizer.pad_id, np.int32)
  answer = np.zeros((n, length), np.float32)
  for i, (prompt, reply) in enumerate(items):
    head = tokenizer.encode(prompt, add_bos=True)
    full = tokenizer.encode(prompt + reply, add_bos=True)
    if full[:len(head)] != head or len(full) == len(head):
      raise ValueError(f'item {i}: the answer {reply!r} does not tokenise as '
                       f'a suffix of the prompt {prompt!r}.')
    if len(full) > length + 1:
      raise ValueError(f'item {i} has {len(full)} tokens; raise the eval '
                       f'length (now {length}).')
    inputs[i, :len(full) - 1] = full[:-1]
    targets[i, :len(full) - 1] = full[1:]
    answer[i, len(head) - 1:len(full) - 1] = 1.0
  return {'inputs': inputs, 'targets': targets, 'answer_mask': answer}


def recall_accuracy(model, params, model_state, encoded, batch_size: int = 256
                    ) -> float:
  """Fraction of items whose whole answer is the model's argmax."""
  correct = []
  for start in range(0, len(encoded['inputs']), batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in encoded.items()}
    correct.append(np.asarray(_correct(model, params, model_state, chunk)))
  return float(np.concatenate(correct).mean()) if correct else float('nan')


@functools.partial(jax.jit, static_argnums=0)
def _correct(model, params, model_state, batch):
  logits = model.apply(transformer.variables(params, model_state),
                       batch['inputs'])
  hit = (jnp.argmax(logits, -1) == batch['targets']) | (batch['answer_mask'] == 0)
  return jnp.all(hit, axis=-1)


# ------------------------------------------------- continual-learning scores ---
# acc_matrix[i][j]: accuracy on session j's evaluation set after cycle i
# (None for j > i: not seen yet). T = number of cycles.


def final_acc(acc_matrix) -> float:
  """ACC: mean accuracy over every session after the last cycle."""
  last = acc_matrix[-1]
  return float(np.mean([a for a in last if a is not None]))


def bwt(acc_matrix) -> float:
  """Backward transfer: mean over j < T-1 of acc[T-1][j] - acc[j][j]
  (Lopez-Paz & Ranzato 2017). Negative = forgetting; 0 with one session."""
  t = len(acc_matrix)
  if t < 2:
    return 0.0
  return float(np.mean([acc_matrix[-1][j] - acc_matrix[j][j]
                        for j in range(t - 1)]))


def forgetting(acc_matrix) -> float:
  """Average forgetting (Chaudhry et al. 2018, "Riemannian Walk for
  Incremental Learning"): mean over sessions j < T-1 of
  max_{i in [j, T-2]} acc[i][j] - acc[T-1][j], i.e. how far each earlier
  session has fallen from its best accuracy before the last cycle.
  Positive = forgetting; 0 with one session."""
  t = len(acc_matrix)
  if t < 2:
    return 0.0
  return float(np.mean([max(acc_matrix[i][j] for i in range(j, t - 1)) -
                        acc_matrix[-1][j] for j in range(t - 1)]))


def acc_all(final_row, base_acc: float, item_counts, base_items: int
            ) -> float:
  """Accuracy over everything known after a cycle: the base population and
  every session so far, pooled, i.e. total correct / total items
  = (base_items * base_acc + sum_j item_counts[j] * final_row[j])
    / (base_items + sum_j item_counts[j]).

  `final_row` is the last row of the accuracy matrix (one accuracy per
  session, e.g. acc_matrix[-1]); `item_counts[j]` is the number of items
  session j is evaluated on; `base_items` the number of base-population
  items `base_acc` is measured on. Unlike `final_acc` (an unweighted mean
  over sessions), each item counts once, so a large base population weighs
  accordingly."""
  row = list(final_row)
  counts = [int(n) for n in item_counts]
  if len(row) != len(counts):
    raise ValueError(f'{len(row)} session accuracies but {len(counts)} item '
                     'counts.')
  if any(a is None for a in row):
    raise ValueError(f'final_row has a session not evaluated yet: {row}.')
  total = int(base_items) + sum(counts)
  if total <= 0:
    raise ValueError('no items: base_items and item_counts are all 0.')
  # base_acc may be None when there is no base population to count
  correct = (int(base_items) * float(base_acc) if base_items else 0.0) + sum(
      n * float(a) for n, a in zip(counts, row))
  return float(correct / total)


def forgetting_curves(acc_matrix) -> list[list[float]]:
  """Per session j: its accuracy after cycles j, j+1, ..., T-1."""
  return [[row[j] for row in acc_matrix[j:]] for j in range(len(acc_matrix))]
