"""Golden values of ONE Knowledge Seeding step and ONE dream round.

The numbers of tests/step_goldens.py's fixed-seed setup on the shared tiny
model, computed in the suite's environment (CPU, 8 fake devices, XLA with
most optimisations off: tests/suite_env.py) and written out below. They
catch a change to what the method computes that every behavioural test
would tolerate. To regenerate them: python tools/make_step_goldens.py
"""

import numpy as np

import step_goldens

SEEDING_STEP = {
    'divergence': 0.11914848536252975,
    'edit_reward': 0.02083333395421505,
    'grad_norm': 0.011488629505038261,
    'loss': 0.06069905683398247,
    'on_policy_fraction': 1.0,
    'pg_loss': 0.0022496310994029045,
    'reward': 0.010416666977107525,
    'semantic_reward': 0.0,
}
DREAM_ROUND = {
    'accepted_rows': 1,
    'accepted_token_sum': 147,
    'kept': 6,
    'reward_fraction': 0.16666666666666666,
    'rewarded': 1,
    'round': 0,
    'tau_after': -4.327630043029785,
    'tau_before': -4.183073043823242,
}


def _check(what: str, got: dict, want: dict) -> None:
  advice = (
      f'{what} no longer computes its golden values. If the change is '
      'intended, re-run `python tools/make_step_goldens.py`, paste its output '
      'into tests/test_golden_steps.py and say why in the commit; if not, a '
      'numerical change slipped in.')
  assert sorted(got) == sorted(want), f'{advice}\nkeys: {sorted(got)}'
  for key in sorted(want):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5,
                               err_msg=f'{key}: {advice}')


def test_one_seeding_step_matches_its_golden_values():
  _check('One Knowledge Seeding step (step_goldens.seeding_step_metrics)',
         step_goldens.seeding_step_metrics(), SEEDING_STEP)


def test_one_dream_round_matches_its_golden_values():
  _check('One dream round (step_goldens.dream_round_stats)',
         step_goldens.dream_round_stats(), DREAM_ROUND)
