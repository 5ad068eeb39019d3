"""Test setup: the suite's JAX environment (suite_env.py, set before JAX is
imported), a persistent compilation cache, the `slow` marker, and shared
fixtures (tiny_models.py).

`python -m pytest -m "not slow" tests` skips the end-to-end runs (whole
studies and main jobs in subprocesses, long trainings): the inner loop.
"""

import suite_env

suite_env.configure()

import contextlib  # noqa: E402
import os  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

import tiny_models  # noqa: E402

_BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'


def _persist_compiled_programs() -> None:
  """Compiling the tiny models takes most of the suite's time: this process
  keeps its programs in a persistent compilation cache, so a run after the
  first loads them (the `-m "not slow"` inner loop takes about a third of
  the time). The numbers are the same; a program loaded from the cache
  still counts for `count_compilations` (JAX times the lookup as a backend
  compile), so compile-once checks are as strict. Set in-process only: the
  suite's subprocesses keep their own environment. JAX_COMPILATION_CACHE_DIR
  picks another directory ('' for none)."""
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return  # JAX reads it itself
  home = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
  jax.config.update('jax_compilation_cache_dir',
                    os.path.join(home, 'sleep_jax', 'test_compilation_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


_persist_compiled_programs()


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'slow: end-to-end runs (subprocesses, whole studies); skip '
      'with -m "not slow"')


# The files whose end-to-end runs take longest, longest first. pytest.ini
# gives each of the two xdist workers whole files in collection order
# (module fixtures such as test_continual's reference run are built once),
# so these start first, one on each worker, and the many short files fill
# in around them instead of waiting at the end.
LONGEST_FILES = ('test_continual.py', 'test_knowledge.py',
                 'test_entry_points.py', 'test_multiprocess.py')


def pytest_collection_modifyitems(config, items):
  del config
  here = os.path.dirname(os.path.abspath(__file__))
  missing = [f for f in LONGEST_FILES
             if not os.path.exists(os.path.join(here, f))]
  if missing:
    raise pytest.UsageError(f'tests/conftest.py LONGEST_FILES names {missing},'
                            ' which do not exist; update the list.')
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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


@pytest.fixture
def tiny_cms():
  """(model, params, model_state) of tiny_models.tiny_cms_model(): the
  two-level CMS model, no expert active."""
  return tiny_models.tiny_cms_model()


@pytest.fixture
def tiny_dense():
  """(model, params, {}) of tiny_models.tiny_dense_model()."""
  return tiny_models.tiny_dense_model()


@pytest.fixture(autouse=True, scope='module')
def _release_compiled_programs():
  """Each compiled XLA:CPU program keeps its machine code in memory maps of
  its own, and jit caches keep every program alive: one process running the
  whole suite passed Linux's default limit of 65,530 maps per process
  (vm.max_map_count) and crashed in native code. Dropping the caches after
  each test module frees them; a module compiled again later loads from the
  persistent compilation cache."""
  yield
  jax.clear_caches()
