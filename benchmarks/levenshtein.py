r"""Why the LTI edit-distance reward runs on the host: a vectorised JAX
dynamic program vs rapidfuzz vs plain Python, side by side in one run.

    python -m benchmarks.levenshtein [--pairs=64,1024 --length=16,64]

For each (pairs, length): token rows as they leave the sampler (device
arrays, padded, with lengths), scored by
  * jax:       `edit_distance` below, one jitted program for all pairs: a
               `lax.scan` over prediction tokens that fills a whole DP row per
               step, using d[i][j] = j + cummin_k<=j (t[k] - k) with
               t[k] = min(d[i-1][k] + 1, d[i-1][k-1] + cost) and t[0] = i;
  * rapidfuzz: device->host copy, then rapidfuzz's C++ Levenshtein per pair
               (what sleep_jax.rewards uses);
  * python:    device->host copy, then a textbook Python DP per pair.
Reports the median of several repeats and the ratios. The last line is
exactly `levenshtein speedup rapidfuzz/jax at <pairs>x<length>: <ratio>x`
(above 1: rapidfuzz is faster).
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from rapidfuzz.distance import Levenshtein

_PAIRS = flags.DEFINE_list('pairs', ['64', '1024'], 'Pairs per call.')
_LENGTH = flags.DEFINE_list('length', ['16', '64'], 'Max tokens per sequence.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats (median).')


def _distance_one(pred_N, pred_len, ref_M, ref_len):
  cols = jnp.arange(ref_M.shape[0] + 1, dtype=jnp.int32)

  def row(prev, inputs):
    i, token = inputs
    cost = (ref_M != token).astype(jnp.int32)
    t = jnp.concatenate([i[None], jnp.minimum(prev[1:] + 1, prev[:-1] + cost)])
    cur = cols + jax.lax.cummin(t - cols)
    return jnp.where(i <= pred_len, cur, prev), None  # freeze past the length

  rows = jnp.arange(1, pred_N.shape[0] + 1, dtype=jnp.int32)
  last, _ = jax.lax.scan(row, cols, (rows, pred_N))
  return last[ref_len]


@jax.jit
def edit_distance(pred_BxN, pred_len_B, ref_BxM, ref_len_B):
  """Levenshtein distances between padded token rows, all pairs at once."""
  return jax.vmap(_distance_one)(pred_BxN.astype(jnp.int32),
                                 pred_len_B.astype(jnp.int32),
                                 ref_BxM.astype(jnp.int32),
                                 ref_len_B.astype(jnp.int32))


def _python_distance(a, b):
  row = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    prev, row = row, [i] + [0] * len(b)
    for j, y in enumerate(b, 1):
      row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (x != y))
  return row[-1]


def _host_scores(distance_fn, pred, pred_len, ref, ref_len):
  pred, ref = np.asarray(pred), np.asarray(ref)
  pred_len, ref_len = np.asarray(pred_len), np.asarray(ref_len)
  return np.array([distance_fn(pred[i, :pred_len[i]].tolist(),
                               ref[i, :ref_len[i]].tolist())
                   for i in range(len(pred))])


def _median_seconds(fn, repeats):
  fn()  # warm-up (compiles the JAX program)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  print(f'device: {jax.devices()[0].device_kind}', flush=True)
  line = ''
  for pairs in map(int, _PAIRS.value):
    for length in map(int, _LENGTH.value):
      rng = np.random.default_rng(0)
      args = [jax.device_put(x) for x in (
          rng.integers(0, 50, (pairs, length)), rng.integers(1, length + 1, pairs),
          rng.integers(0, 50, (pairs, length)), rng.integers(1, length + 1, pairs))]
      jax_fn = lambda: np.asarray(edit_distance(*args))
      rf_fn = lambda: _host_scores(Levenshtein.distance, *args)
      py_fn = lambda: _host_scores(_python_distance, *args)
      assert (jax_fn() == rf_fn()).all() and (py_fn() == rf_fn()).all()
      t_jax, t_rf, t_py = (_median_seconds(f, _REPEATS.value)
                           for f in (jax_fn, rf_fn, py_fn))
      print(f'{pairs:5d} pairs x {length:3d} tokens | jax {1e3 * t_jax:8.2f} ms | '
            f'rapidfuzz {1e3 * t_rf:8.2f} ms | python {1e3 * t_py:9.2f} ms | '
            f'rapidfuzz/jax {t_jax / t_rf:5.1f}x | jax/python {t_py / t_jax:5.1f}x',
            flush=True)
      line = (f'levenshtein speedup rapidfuzz/jax at {pairs}x{length}: '
              f'{t_jax / t_rf:.2f}x')
  print(line)


if __name__ == '__main__':
  app.run(main)
