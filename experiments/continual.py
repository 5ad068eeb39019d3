r"""The main job: wake/sleep cycles against the baselines.

docs/design.md §10.1.

    python -m experiments.continual                      # the default
    python -m experiments.continual --config=experiments/configs/continual.py:full \
        --workdir=/tmp/continual_full

Variants: "" (the default), full, long, smoke, validation, lr_sweep
(comma-separated; experiments/configs/continual.py says what each is). Any
config key can be overridden: --config.<key>.<subkey>=<value>.

Re-running the same command resumes from the last completed cycle; other
methods or seeds in the same --workdir add to its results.json; any other
change of the config needs its own --workdir. Errors are one line;
--traceback shows the Python traceback, --verbosity=0 the library logs.
"""

from absl import app
from absl import flags

from sleep_jax import cli
from sleep_jax import sharding

_CONFIG = cli.define_config(__file__, 'continual.py')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/continual', 'Output directory.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sharding.maybe_initialize_distributed()
  from sleep_jax.studies import continual as study  # after distributed init
  study.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
