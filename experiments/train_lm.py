r"""Trains a language model from an ml_collections config.

    python -m experiments.train_lm --config=experiments/configs/train_lm.py \
        --workdir=/tmp/train_lm [--config.num_train_steps=100 ...]

Re-running the same command resumes from the latest checkpoint in --workdir.
"""

from absl import app
from absl import flags

from sleep_jax import cli
from sleep_jax import sharding

_CONFIG = cli.define_config(__file__, None)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
_STOP_AFTER = flags.DEFINE_integer(
    'stop_after', None, 'Stop (with a checkpoint) after this step.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sharding.maybe_initialize_distributed()
  from sleep_jax import lm_trainer  # after distributed init
  lm_trainer.train(_CONFIG.value, _WORKDIR.value, stop_after=_STOP_AFTER.value)


if __name__ == '__main__':
  cli.run(main)
