"""Timing shared by the benchmarks: best-of-n wall time and the machine's
practical matmul peak, both measured in the calling run."""

from __future__ import annotations

import time

import jax


def best_seconds(fn, repeats: int) -> float:
  """Fastest of `repeats` timed calls of `fn`, after one untimed call
  (compile + warm-up)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)


def peak_matmul_flops(n: int, dtype) -> float:
  """FLOP/s of an n x n x n matmul in `dtype` (the machine's practical peak)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  return 2 * n ** 3 / best_seconds(lambda: matmul(a, b), repeats=5)
