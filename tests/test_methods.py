"""The method registry: one object per method, added in one place."""

import types

import pytest

from sleep_jax import lifecycle
from sleep_jax import methods
from sleep_jax.seeding import SeedingConfig


def _settings(**overrides):
  """What `Lifecycle.__init__` reads of its settings."""
  return types.SimpleNamespace(**{
      'seeding': SeedingConfig(), 'method_seeding': {}, 'base_replay': None,
      'compute_steps': 0, **overrides})


def test_the_registry_holds_the_fourteen_methods_by_name():
  assert list(methods.METHODS) == [
      'sleep', 'sleep_no_anchor', 'sleep_no_expansion', 'sleep_no_lti',
      'sleep_no_dreaming', 'no_consolidation', 'finetune', 'finetune_anchor',
      'finetune_compute', 'lora_finetune', 'replay', 'replay_all', 'ewc',
      'seal']
  assert all(name == m.name for name, m in methods.METHODS.items())


def test_methods_that_wake_alike_share_their_batches():
  kinds = {name: m.wake_kind for name, m in methods.METHODS.items()}
  assert {kinds[n] for n in kinds if n.startswith('sleep')} == {'cms'}
  assert kinds['no_consolidation'] == 'cms'
  assert {kinds[n] for n in ('finetune', 'finetune_anchor',
                             'finetune_compute', 'replay', 'replay_all',
                             'ewc')} == {'finetune'}
  assert kinds['lora_finetune'] == 'lora' and kinds['seal'] == 'none'


def test_a_name_is_registered_once(monkeypatch):
  monkeypatch.setattr(methods, 'METHODS', dict(methods.METHODS))
  with pytest.raises(ValueError, match="'finetune' is registered already"):
    methods.register(methods.Finetune('finetune'))
  extra = methods.register(methods.Method('frozen'))
  assert methods.METHODS['frozen'] is extra
  run = lifecycle.Lifecycle('frozen', 0, _settings(), '/nonexistent')
  assert run.method is extra and run.seeding == SeedingConfig()


def test_experts_grown_per_sleep_follow_the_method_and_its_knobs():
  knobs = {'expansion': True, 'experts': 2}
  grown = {name: m.grown_per_sleep(knobs)
           for name, m in methods.METHODS.items()}
  assert grown['sleep'] == grown['sleep_no_dreaming'] == 2
  assert grown['seal'] == 1  # dreaming alone grows one to rehearse into
  assert grown['finetune'] == grown['no_consolidation'] == 0
  assert methods.METHODS['sleep'].grown_per_sleep(
      {'expansion': False, 'experts': 2}) == 1


def test_the_lifecycle_applies_method_and_config_seeding_and_checks_needs():
  run = lifecycle.Lifecycle('sleep_no_lti', 0, _settings(
      method_seeding={'sleep_no_lti': {'num_steps': 7}}), '/nonexistent')
  assert run.seeding.alpha == 1.0 and run.seeding.num_steps == 7
  with pytest.raises(ValueError, match='sleep_no_lti sets'):
    lifecycle.Lifecycle('sleep_no_lti', 0, _settings(
        method_seeding={'sleep_no_lti': {'alpha': 0.5}}), '/nonexistent')
  with pytest.raises(ValueError, match='Settings.base_replay'):
    lifecycle.Lifecycle('replay_all', 0, _settings(), '/nonexistent')
  with pytest.raises(ValueError, match='compute_steps >= 1'):
    lifecycle.Lifecycle('finetune_compute', 0, _settings(), '/nonexistent')
  with pytest.raises(ValueError, match="Unknown method 'sleeep'"):
    lifecycle.Lifecycle('sleeep', 0, _settings(), '/nonexistent')


def test_each_method_names_the_rate_its_wake_trains_with():
  settings = types.SimpleNamespace(
      baselines=types.SimpleNamespace(finetune_learning_rate=1e-3,
                                      ewc_learning_rate=2e-3,
                                      lora_learning_rate=3e-3),
      model=types.SimpleNamespace(config=types.SimpleNamespace(
          cms_levels=[types.SimpleNamespace(learning_rate=4e-3)])),
      fast_level=0)
  rate = lambda name: methods.METHODS[name].wake_learning_rate(settings)
  assert rate('finetune') == ('baselines.finetune_learning_rate', 1e-3)
  assert rate('ewc') == ('baselines.ewc_learning_rate', 2e-3)
  assert rate('lora_finetune') == ('baselines.lora_learning_rate', 3e-3)
  assert rate('sleep') == ('model.cms_levels[0].learning_rate', 4e-3)
  with pytest.raises(NotImplementedError):
    rate('seal')
