r"""The CMS wake study: online fast levels vs frozen MLPs on a stream of facts.

    python -m experiments.cms_recall --config=experiments/configs/cms_recall.py \
        --workdir=/tmp/cms_recall
"""

from absl import app
from absl import flags

from sleep_jax import cli
from sleep_jax import sharding

_CONFIG = cli.define_config(__file__, 'cms_recall.py')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/cms_recall', 'Output directory.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sharding.maybe_initialize_distributed()
  from sleep_jax.studies import cms_recall as study  # after distributed init
  study.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
