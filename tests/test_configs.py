"""The configs' shared `:arg` parser, and every variant of every config
passing its study's own checks."""

import importlib
import itertools

import pytest

from experiments.configs import common

VARIANTS = {'full': 'all methods', 'smoke': 'a tiny model', 'long': ''}


def test_variants_are_flags_and_keys_typed_by_their_default():
  arg = common.parse_arg(' smoke,,n=3, lr=1e-3,on=False,name=x=y ', 'c.py',
                         VARIANTS, n=1, lr=0.1, on=True, name='a', rest=2)
  assert arg.to_dict() == dict(full=False, smoke=True, long=False, n=3,
                               lr=1e-3, on=False, name='x=y', rest=2)
  assert type(arg.n) is int and type(arg.lr) is float
  assert common.parse_arg(None, 'c.py', VARIANTS).to_dict() == dict(
      full=False, smoke=False, long=False)
  assert common.parse_arg('', 'c.py', {}).to_dict() == {}
  for text, value in [('true', True), ('YES', True), ('1', True),
                      ('no', False), ('0', False)]:
    assert common.parse_arg(f'on={text}', 'c.py', {}, on=False).on is value
  # An int default takes no float; a float default takes an int.
  assert common.parse_arg('lr=1', 'c.py', {}, lr=0.5).lr == 1.0


@pytest.mark.parametrize('arg, message', [
    ('smoke,fulll', """Unknown variant 'fulll' of continual.py; valid: "" """
                    '(default), full (all methods), smoke (a tiny model), '
                    'long (comma-separated)'),
    ('n=3', """Unknown key 'n' in 'n=3' of continual.py; valid: "" """
            '(default), full (all methods), smoke (a tiny model), long '
            '(comma-separated)'),
    ('smoke=1', "Unknown key 'smoke' in 'smoke=1' of continual.py"),
])
def test_unknown_items_are_one_line_naming_file_item_and_choices(arg,
                                                                 message):
  with pytest.raises(ValueError) as e:
    common.parse_arg(arg, '/somewhere/continual.py', VARIANTS)
  assert str(e.value).startswith(message) and '\n' not in str(e.value)


def test_keys_are_listed_with_their_defaults_and_bad_values_named():
  with pytest.raises(ValueError, match=r"""Unknown variant 'x' of c.py; """
                     r"""valid: "" \(default\), smoke \(a\); keys: """
                     r"""steps=10 \(int\), name='b' \(str\) """
                     r'\(comma-separated\)$'):
    common.parse_arg('x', 'c.py', {'smoke': 'a'}, steps=10, name='b')
  for arg, message in [
      ('steps=1.5', "'steps=1.5' of c.py: steps takes an int (default 10), "
                    "not '1.5'"),
      ('on=maybe', "'on=maybe' of c.py: on takes a bool (default True), "
                   "not 'maybe'"),
      ('lr=fast', "'lr=fast' of c.py: lr takes a float (default 0.1), "
                  "not 'fast'")]:
    with pytest.raises(ValueError) as e:
      common.parse_arg(arg, 'c.py', {}, steps=10, on=True, lr=0.1)
    assert str(e.value) == message


def test_bad_parser_use_fails_in_the_config_itself():
  with pytest.raises(ValueError, match=r"c.py: \['smoke'\] are both"):
    common.parse_arg('', 'c.py', VARIANTS, smoke=True)
  with pytest.raises(TypeError, match="key 'seeds' has a default of type "
                     'tuple'):
    common.parse_arg('', 'c.py', {}, seeds=(0, 1))


def test_shared_blocks_are_fresh_and_take_overrides():
  a, b = common.fact_world_model(), common.fact_world_model(max_len=160)
  a.cms_levels[0]['width'] = 1
  assert b.cms_levels[0]['width'] == 64 and b.max_len == 160
  assert common.optimizer(warmup_steps=5).warmup_steps == 5
  assert common.optimizer().warmup_steps == 100
  common.smoke_model(a, width=32, rank=4)
  assert (a.d_model, a.num_layers, a.d_ff) == (32, 1, 64)
  assert [(l['width'], l['rank']) for l in a.cms_levels] == [(32, 4)] * 2


def _validator(study: str):
  if study == 'train_lm':
    from sleep_jax import lm_trainer
    return lm_trainer.validate_config
  if study == 'continual':  # the main job keeps its checks apart
    study = 'continual_checks'
  return importlib.import_module(f'sleep_jax.studies.{study}').validate_config


STUDIES = ['cms_recall', 'continual', 'dreaming', 'knowledge', 'seeding',
           'train_lm']


@pytest.mark.parametrize('study', STUDIES)
def test_every_variant_passes_the_study_checks_in_any_order(study):
  """Each variant alone and with smoke (the study's own validate_config:
  model, levels, knobs); a pair is the same config in either order."""
  module = importlib.import_module(f'experiments.configs.{study}')
  validate = _validator(study)
  names = list(module.VARIANTS)
  assert 'smoke' in names
  for arg in ['', *names, *[f'{v},smoke' for v in names if v != 'smoke']]:
    validate(module.get_config(arg))
  for a, b in itertools.combinations(names, 2):
    assert (module.get_config(f'{a},{b}').to_dict()
            == module.get_config(f'{b},{a}').to_dict()), (a, b)
  with pytest.raises(ValueError, match=f"^Unknown variant 'smok' of "
                     f'{study}.py; valid: "" \\(default\\), {names[0]} '):
    module.get_config('smok')


def test_continual_method_lists_follow_the_registry():
  from experiments.configs import continual
  from sleep_jax.methods import METHODS
  assert continual.ALL_METHODS == tuple(METHODS)
  assert continual.get_config('full').methods == tuple(METHODS)
  sweep = continual.get_config('lr_sweep')
  assert sweep.methods == ('finetune', 'finetune_anchor', 'finetune_compute',
                           'lora_finetune', 'replay', 'replay_all', 'ewc')
  assert (sweep.seeds, sweep.world.seed) == ((0,), continual.VALIDATION_WORLD)
  assert set(continual.get_config().methods) <= set(METHODS)
