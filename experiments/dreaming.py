r"""The dreaming study: ReST-EM and rehearsal on a toy world.

    python -m experiments.dreaming --config=experiments/configs/dreaming.py \
        --workdir=/tmp/dreaming
"""

from absl import app
from absl import flags

from sleep_jax import cli
from sleep_jax import sharding

_CONFIG = cli.define_config(__file__, 'dreaming.py')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/dreaming', 'Output directory.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sharding.maybe_initialize_distributed()
  from sleep_jax.studies import dreaming as study  # after distributed init
  study.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
