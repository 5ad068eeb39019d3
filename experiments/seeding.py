r"""The Knowledge Seeding study: consolidating a fast level into a slow one.

    python -m experiments.seeding --config=experiments/configs/seeding.py \
        --workdir=/tmp/seeding
"""

from absl import app
from absl import flags

from sleep_jax import cli
from sleep_jax import sharding

_CONFIG = cli.define_config(__file__, 'seeding.py')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/seeding', 'Output directory.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sharding.maybe_initialize_distributed()
  from sleep_jax.studies import seeding as study  # after distributed init
  study.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
