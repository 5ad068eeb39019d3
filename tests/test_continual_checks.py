"""The main job's config checks and capacity rule (studies/continual_checks.py)."""

import os
import subprocess
import sys

import pytest

from experiments.configs import continual as continual_config
from sleep_jax.studies import continual
from sleep_jax.studies import continual_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_bad_configs_fail_before_compiling(tmp_path, compile_counter):
  cases = [
      (dict(sleep_alpha=2.0), 'sleep.alpha=2'),
      (dict(chunks=(2, 3)), r'model.cms_levels\[1\].chunk_size=3'),
      (dict(methods=['sleep', 'bogus']), 'bogus'),
      (dict(num_experts=2), r'model.cms_levels\[1\].num_experts=2 is too small'),
      (dict(lora_rank=0), 'lora.rank=0'),
      (dict(judge='teacher'), "sleep.judge='teacher' is not available"),
      (dict(wake_anchor=-1.0), 'wake.anchor_weight=-1.0 must be >= 0'),
      (dict(per_method_judge='embedding'),
       r"sleep_per_method.sleep sets \['judge'\]"),
  ]
  for change, message in cases:
    config = continual_config.get_config('smoke')
    if 'sleep_alpha' in change:
      config.sleep.alpha = change['sleep_alpha']
    if 'judge' in change:
      config.sleep.judge = change['judge']
    if 'wake_anchor' in change:
      config.wake.anchor_weight = change['wake_anchor']
    if 'per_method_judge' in change:
      config.sleep_per_method.sleep = {'judge': change['per_method_judge']}
    if 'chunks' in change:
      for level, chunk in zip(config.model.cms_levels, change['chunks']):
        level['chunk_size'] = chunk
    if 'methods' in change:
      config.methods = change['methods']
    if 'num_experts' in change:
      config.model.cms_levels[1].update(num_experts=change['num_experts'],
                                        top_k=change['num_experts'] + 1)
    if 'lora_rank' in change:
      config.baselines.lora_rank = change['lora_rank']
    workdir = tmp_path / 'never'
    with compile_counter() as compiled:
      with pytest.raises(ValueError, match=message):
        continual.run(config, str(workdir))
    assert compiled() == 0 and not workdir.exists()
  # The command line fails the same way, naming the key.
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.continual',
       '--config=experiments/configs/continual.py:smoke',
       f'--workdir={tmp_path / "cli"}', '--config.sleep.alpha=2'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and 'sleep.alpha=2' in proc.stderr
  assert 'base model' not in proc.stdout
