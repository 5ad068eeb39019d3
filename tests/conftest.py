"""Test setup: 8 fake CPU devices (set before JAX is imported) and helpers."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The suite's models are tiny, so compiling takes most of its time; XLA
# without most optimisation passes compiles about a third faster and computes
# within every tolerance here. JAX_DISABLE_MOST_OPTIMIZATIONS=0 tests the
# optimised programs users run.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# The float32 tolerances of the suite assume full-precision matmuls: GPUs give
# them only at 'highest' (their default is TF32-class); CPUs always do.
if os.environ['JAX_PLATFORMS'] != 'cpu':
  os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')

import contextlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

_BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'


@contextlib.contextmanager
def count_compilations():
  """Counts XLA backend compilations inside the block: `with ... as n: ...; n()`."""
  count = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == _BACKEND_COMPILE:
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield lambda: count[0]
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def compile_counter():
  return count_compilations


@pytest.fixture(scope='session')
def compilation_cache(tmp_path_factory) -> dict[str, str]:
  """Env vars that give the suite's subprocesses one persistent compilation
  cache: a command run again (resume after kill -9) loads its programs
  instead of compiling them, and computes the same numbers."""
  return {'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('jax_cache')),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
