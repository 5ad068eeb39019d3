r"""The main job: wake/sleep cycles against the baselines.

docs/design.md §10.1.

    python -m experiments.continual                      # the default
    python -m experiments.continual --config=experiments/configs/continual.py:full \
        --workdir=/tmp/continual_full

Re-running the same command resumes from the last completed cycle.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from sleep_jax import sharding

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'experiments/configs/continual.py',
    'Path to a config file, optionally with ":variant".', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/continual', 'Output directory.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sharding.maybe_initialize_distributed()
  from sleep_jax import continual  # after distributed init, by design
  continual.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
