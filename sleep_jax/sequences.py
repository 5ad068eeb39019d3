"""Prompt + completion sequences, as the sleep stages train on them.

A prompt and a completion are joined right-padded, and a [B, W] mask marks
the logit positions that predict completion tokens (prompt positions and
padding never count). Knowledge Seeding, dreaming's SFT rows and its
selection gradients all use this layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames='pad_id')
def join(prompt_BxP, prompt_len_B, completion_BxN, completion_len_B, *,
         pad_id: int = 0):
  """prompt[:len] ++ completion[:len] ++ pad, and the completion logit mask.

  Returns tokens int32[B, P+N] and mask f32[B, P+N], where mask[b, t] = 1
  iff the logits at t predict a completion token (t + 1 is in the
  completion).
  """
  width = prompt_BxP.shape[1] + completion_BxN.shape[1]
  col = jnp.arange(width)[None, :]
  plen, clen = prompt_len_B[:, None], completion_len_B[:, None]
  from_prompt = jnp.take_along_axis(
      prompt_BxP, jnp.minimum(col, prompt_BxP.shape[1] - 1), axis=1)
  from_completion = jnp.take_along_axis(
      completion_BxN, jnp.clip(col - plen, 0, completion_BxN.shape[1] - 1),
      axis=1)
  tokens = jnp.where(col < plen, from_prompt,
                     jnp.where(col < plen + clen, from_completion, pad_id))
  mask = (col >= plen - 1) & (col < plen + clen - 1)
  return tokens.astype(jnp.int32), mask.astype(jnp.float32)


def completion_logprobs(logits_BxLxV, tokens_BxL):
  """log p(token t+1 | prefix) at each position t (the last one is 0)."""
  log_p = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), -1)
  picked = jnp.take_along_axis(log_p, tokens_BxL[:, 1:, None], -1)[..., 0]
  return jnp.pad(picked, ((0, 0), (0, 1)))
