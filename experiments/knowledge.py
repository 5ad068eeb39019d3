r"""The knowledge-incorporation table: SQuAD passages, SEAL's protocol.

    python -m experiments.knowledge --config=experiments/configs/knowledge.py:cpu \
        --workdir=/tmp/knowledge
"""

from absl import app
from absl import flags

from sleep_jax import cli
from sleep_jax import sharding

_CONFIG = cli.define_config(__file__, 'knowledge.py')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/knowledge', 'Output directory.')
_PLAN = flags.DEFINE_bool(
    'plan', False, 'Do not run: write plan.md / plan.json (memory estimate, '
    'eval_shape of the step, work ledger, runtime estimate from per-token '
    'costs measured here) and print the plan.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sharding.maybe_initialize_distributed()
  if _PLAN.value:
    from sleep_jax.studies import knowledge_plan  # after distributed init
    print(knowledge_plan.write(_CONFIG.value, _WORKDIR.value))
    return
  from sleep_jax.studies import knowledge as study  # after distributed init
  study.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
