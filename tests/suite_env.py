"""The suite's JAX environment, set before JAX is imported: by conftest.py
for the tests, and by tools/make_step_goldens.py, so that the golden numbers
it prints are those the tests compute.

8 fake CPU devices; XLA without most optimisation passes (the suite's models
are tiny, so compiling takes most of its time, and this compiles about a
third faster and computes within every tolerance here;
JAX_DISABLE_MOST_OPTIMIZATIONS=0 tests the optimised programs users run);
full-precision matmuls on GPUs (the float32 tolerances of the suite assume
them: GPUs give them only at 'highest', their default is TF32-class; CPUs
always do).
"""

import os


def configure(environ=os.environ) -> None:
  """Sets the suite's variables in `environ` (already-set ones win, except
  that the 8 devices are always added to XLA_FLAGS)."""
  environ['XLA_FLAGS'] = (environ.get('XLA_FLAGS', '') +
                          ' --xla_force_host_platform_device_count=8').strip()
  environ.setdefault('JAX_PLATFORMS', 'cpu')
  environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
  if environ['JAX_PLATFORMS'] != 'cpu':
    environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
