"""The main job's config checks and capacity rule (studies/continual_checks.py)."""

import pytest

from experiments.configs import continual as continual_config
from sleep_jax.studies import continual_checks


def test_capacity_scales_each_sessions_budget_with_its_size():
  config = continual_config.get_config()
  assert continual_checks.scaled_config(config).to_dict() == config.to_dict()
  config.world.people_per_session = 40  # 2.5 x the 16 the steps are for
  scaled = continual_checks.scaled_config(config)
  assert (scaled.wake.steps, scaled.sleep.num_steps, scaled.sleep.experts,
          scaled.dreaming.rehearse_steps) == (375, 500, 2, 250)
  assert scaled.sleep.batch_size == config.sleep.batch_size
  # Four experts a sleep for 64 people: three sessions need 2 + 12 slots.
  config.world.people_per_session = 64
  with pytest.raises(ValueError, match=r'num_experts=8 is too small: the base '
                     r'uses 2 and sleep grows 4 per session \(3 sessions\)'):
    continual_checks.validate_config(continual_checks.scaled_config(config))
  config.sessions = 1
  continual_checks.validate_config(continual_checks.scaled_config(config))
  config.world.people_per_session = 40
  config.capacity.people = 0
  assert continual_checks.scaled_config(config).wake.steps == 150
  config.capacity.update(people=16, scaled=('wake.nope',))
  with pytest.raises(ValueError, match="capacity.scaled has 'wake.nope'"):
    continual_checks.scaled_config(config)


def test_sleep_per_method_overrides_are_checked_and_applied():
  config = continual_config.get_config('full')
  parsed = continual_checks.validate_config(config)
  assert parsed['sleep_per_method'] == {
      'sleep_no_expansion': {'learning_rate': 1e-3}}
  config.sleep_per_method = {'finetune': {'learning_rate': 1.0}}
  with pytest.raises(ValueError, match="sleep_per_method has 'finetune'"):
    continual_checks.validate_config(config)
  config.sleep_per_method = {'sleep': {'alpha': 3.0}}
  with pytest.raises(ValueError, match=r'sleep_per_method.sleep: sleep.alpha=3'):
    continual_checks.validate_config(config)
