"""Will a config fit in memory? Answered before any data is built or any
program compiled, from shapes alone (`jax.eval_shape` allocates nothing).

A model far too large for the machine does not fail cleanly later: XLA may
try to allocate it piece by piece and swap, or block, for a long time.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

_GIB = 2.0**30
# Training holds params, gradients and AdamW's two moments, plus up to two
# frozen copies (an anchor, a teacher): eight float32 copies in all.
TRAINING_COPIES = 8


def memory_limit() -> tuple[float, str]:
  """(bytes, what) the run may use: the first device's memory on an
  accelerator, else the host's physical memory."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats and stats.get('bytes_limit'):
    return float(stats['bytes_limit']), f'{device.device_kind} memory'
  pages = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  return float(pages), 'host memory'


def training_bytes(model, batch_size: int, seq_len: int) -> tuple[float, int]:
  """(estimated bytes, parameters) to train `model` on [batch_size, seq_len]
  tokens: weights and optimizer state, activations kept for the backward
  pass and the logits with their gradient."""
  tokens = jax.ShapeDtypeStruct((1, min(seq_len, 8)), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
  params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))
  c = model.config
  per_token = c.num_layers * (12 * c.d_model + 3 * c.d_ff +
                              c.num_heads * seq_len) + 2 * c.vocab_size
  activations = 4.0 * batch_size * seq_len * per_token
  return 4.0 * TRAINING_COPIES * params + activations, params


def check_fits(model, batch_size: int, seq_len: int, keys: str) -> None:
  """Raises ValueError with the estimate if training `model` cannot fit;
  `keys` names what the user can change."""
  need, params = training_bytes(model, batch_size, seq_len)
  limit, what = memory_limit()
  if need > 0.9 * limit:
    raise ValueError(
        f'the model does not fit: {params:,} parameters, about '
        f'{need / _GIB:,.1f} GiB to train at batch {batch_size} x {seq_len} '
        f'tokens, against {limit / _GIB:,.1f} GiB of {what}; lower {keys}.')
