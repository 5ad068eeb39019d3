"""Token-level divergences for distillation, in TRL's convention.

docs/design.md §4.1.

Each is a mean over the masked positions (completion tokens), with a
temperature applied to both distributions. Re-exported by sleep_jax.seeding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _log_probs(logits, temperature: float):
  return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _kl(log_p, log_q):
  """KL(p || q) per position, summed over the vocabulary."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def masked_mean(per_token_BxL, mask_BxL):
  mask = jnp.asarray(mask_BxL, jnp.float32)
  total = jnp.sum(jnp.where(mask > 0, per_token_BxL * mask, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def forward_kl(student_logits, teacher_logits, mask, *, temperature=1.0):
  """KL(T || S), mean over masked positions."""
  log_s = _log_probs(student_logits, temperature)
  log_t = _log_probs(teacher_logits, temperature)
  return masked_mean(_kl(log_t, log_s), mask)


def reverse_kl(student_logits, teacher_logits, mask, *, temperature=1.0):
  """KL(S || T), mean over masked positions."""
  log_s = _log_probs(student_logits, temperature)
  log_t = _log_probs(teacher_logits, temperature)
  return masked_mean(_kl(log_s, log_t), mask)


def generalized_jsd(student_logits, teacher_logits, mask, *, beta,
                    temperature=1.0):
  """Generalised JSD in TRL's convention, mean over masked positions.

  M = (1 - beta) S + beta T (mixed in probability space, in log space);
  JSD_beta = beta KL(T || M) + (1 - beta) KL(S || M). beta = 0 is
  forward KL(T || S) and beta = 1 is reverse KL(S || T) (special-cased: the
  mixture formula degenerates to 0 there). `beta` is a Python float.
  """
  beta = float(beta)
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f'beta={beta} must be in [0, 1].')
  if beta == 0.0:
    return forward_kl(student_logits, teacher_logits, mask,
                      temperature=temperature)
  if beta == 1.0:
    return reverse_kl(student_logits, teacher_logits, mask,
                      temperature=temperature)
  log_s = _log_probs(student_logits, temperature)
  log_t = _log_probs(teacher_logits, temperature)
  log_m = jnp.logaddexp(log_s + np.log(1.0 - beta), log_t + np.log(beta))
  per_token = beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
  return masked_mean(per_token, mask)


