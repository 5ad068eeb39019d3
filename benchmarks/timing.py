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


def device_line() -> str:
  """The first line of every benchmark: the device and JAX's float32 matmul
  precision, which on GPUs defaults to TF32-class tensor-core passes (set
  JAX_DEFAULT_MATMUL_PRECISION=highest for full float32) and on CPUs is
  full float32 either way."""
  device = jax.devices()[0]
  precision = jax.config.jax_default_matmul_precision or 'default'
  return (f'device: {device.platform} {device.device_kind} '
          f'x{jax.device_count()}, matmul precision: {precision}')


def peak_matmul_size(requested: int) -> int:
  """`requested`, or with 0 the size that measures a practical peak: 2048 on
  CPUs (a few seconds); 8192 on accelerators, where 2048^3 does not fill the
  chip (on an H100 it ran slower than benchmarks.lm's train step)."""
  if requested < 0:
    raise ValueError(f'--matmul_size={requested} must be >= 0 (0: 2048 on '
                     'CPUs, 8192 on accelerators).')
  if requested:
    return requested
  return 2048 if jax.devices()[0].platform == 'cpu' else 8192


def peak_matmul_flops(n: int, dtype) -> float:
  """FLOP/s of an n x n x n matmul in `dtype` (the machine's practical peak)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  return 2 * n ** 3 / best_seconds(lambda: matmul(a, b), repeats=5)
