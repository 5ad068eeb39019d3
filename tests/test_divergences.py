"""Token-level divergences (sleep_jax.divergences) against a numpy reference."""

import numpy as np
import pytest

from sleep_jax import divergences
from sleep_jax import seeding


# ------------------------------------------------- numpy reference ---------


def np_log_softmax(logits, temperature):
  z = logits.astype(np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(p, q):
  """KL(p || q) per position from probabilities."""
  return np.sum(p * (np.log(p) - np.log(q)), -1)


def np_divergence(kind, student, teacher, mask, beta=0.5, temperature=1.0):
  s = np.exp(np_log_softmax(student, temperature))
  t = np.exp(np_log_softmax(teacher, temperature))
  if kind == 'forward':
    per = np_kl(t, s)
  elif kind == 'reverse':
    per = np_kl(s, t)
  else:  # TRL: M = (1 - beta) S + beta T; beta KL(T||M) + (1 - beta) KL(S||M)
    m = (1 - beta) * s + beta * t
    per = beta * np_kl(t, m) + (1 - beta) * np_kl(s, m)
  return float(np.sum(per * mask) / np.sum(mask))


@pytest.fixture
def logits():
  rng = np.random.default_rng(0)
  student = rng.normal(size=(3, 5, 11)) * 2
  teacher = rng.normal(size=(3, 5, 11)) * 2
  mask = (rng.random((3, 5)) < 0.6).astype(np.float32)
  mask[0, 0] = 1.0
  return student.astype(np.float32), teacher.astype(np.float32), mask


@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_divergences_match_numpy_reference(logits, temperature):
  s, t, mask = logits
  fwd = divergences.forward_kl(s, t, mask, temperature=temperature)
  rev = divergences.reverse_kl(s, t, mask, temperature=temperature)
  np.testing.assert_allclose(fwd, np_divergence('forward', s, t, mask,
                                                temperature=temperature), rtol=1e-5)
  np.testing.assert_allclose(rev, np_divergence('reverse', s, t, mask,
                                                temperature=temperature), rtol=1e-5)
  for beta in (0.1, 0.5, 0.9):
    np.testing.assert_allclose(
        divergences.generalized_jsd(s, t, mask, beta=beta,
                                    temperature=temperature),
        np_divergence('jsd', s, t, mask, beta, temperature), rtol=1e-5)
  # Endpoints in TRL's convention.
  np.testing.assert_allclose(divergences.generalized_jsd(
      s, t, mask, beta=0.0, temperature=temperature), fwd, rtol=1e-6)
  np.testing.assert_allclose(divergences.generalized_jsd(
      s, t, mask, beta=1.0, temperature=temperature), rev, rtol=1e-6)
  assert abs(float(fwd) - float(rev)) > 1e-3  # the endpoints really differ


def test_jsd_symmetry_zero_and_masking(logits):
  s, t, mask = logits
  jsd = divergences.generalized_jsd
  np.testing.assert_allclose(jsd(s, t, mask, beta=0.5),
                             jsd(t, s, mask, beta=0.5), rtol=1e-6)
  assert abs(float(jsd(s, t, mask, beta=0.3))
             - float(jsd(t, s, mask, beta=0.3))) > 1e-4
  for fn in (divergences.forward_kl, divergences.reverse_kl,
             lambda a, b, m: jsd(a, b, m, beta=0.5)):
    assert float(fn(s, s, mask)) == pytest.approx(0.0, abs=1e-6)
    # Garbage (even NaN) at masked positions changes nothing.
    s2, t2 = s.copy(), t.copy()
    s2[mask == 0] = np.nan
    t2[mask == 0] = 1e4
    np.testing.assert_allclose(fn(s2, t2, mask), fn(s, t, mask), rtol=1e-6)


def test_seeding_exports_the_divergences():
  """sleep_jax.seeding.generalized_jsd (and its KLs) are public API: the
  same functions as sleep_jax.divergences'."""
  assert seeding.generalized_jsd is divergences.generalized_jsd
  assert seeding.forward_kl is divergences.forward_kl
  assert seeding.reverse_kl is divergences.reverse_kl
