"""Prints the golden values of tests/test_golden_steps.py: the metrics of
ONE Knowledge Seeding step and ONE dream round on the suite's tiny model.

    python tools/make_step_goldens.py

When a change moves them on purpose, paste the output over SEEDING_STEP and
DREAM_ROUND in tests/test_golden_steps.py and say why in the commit. The
setup is tests/step_goldens.py (the test runs the same functions), in the
suite's JAX environment (tests/suite_env.py: 8 fake CPU devices, XLA with
most optimisations off), set here before JAX is imported.
"""

import contextlib
import os
import sys

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'tests')
sys.path.insert(0, _TESTS)

import suite_env  # noqa: E402

suite_env.configure()

import step_goldens  # noqa: E402  (imports JAX)


def literal(name: str, values: dict) -> str:
  """`name = {...}`, one key a line, sorted, floats in full (repr)."""
  lines = [f'    {key!r}: {values[key]!r},' for key in sorted(values)]
  return '\n'.join([f'{name} = {{', *lines, '}'])


def main():
  with contextlib.redirect_stdout(sys.stderr):  # progress lines: not output
    seeding_step = step_goldens.seeding_step_metrics()
    dream_round = step_goldens.dream_round_stats()
  print(literal('SEEDING_STEP', seeding_step))
  print(literal('DREAM_ROUND', dream_round))


if __name__ == '__main__':
  main()
