"""The knowledge-incorporation study (sleep_jax.studies.knowledge and its
knowledge_setup, knowledge_rows and knowledge_plan modules)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import knowledge as knowledge_config
from sleep_jax import dream_sft
from sleep_jax import dreaming
from sleep_jax import growth
from sleep_jax.models import lora
from sleep_jax.studies import knowledge
from sleep_jax.studies import knowledge_plan
from sleep_jax.studies import knowledge_qa as qa
from sleep_jax.studies import knowledge_rows


@pytest.fixture(scope='module')
def smoke_setup():
  return knowledge.setup(knowledge_config.get_config('smoke'))


def test_fixture_split_has_only_answerable_and_disjoint(smoke_setup):
  s = smoke_setup
  train, evaluated = {p.id for p in s.train}, {p.id for p in s.eval}
  assert not train & evaluated
  assert len(train) == 2 and len(evaluated) == 3
  # The fixture gives every passage one unanswerable question ('fx..x').
  ids = [q.id for p in s.train + s.eval for q in p.questions]
  assert ids and not any(i.endswith('x') for i in ids)


def test_backbone_with_fast_levels_computes_the_backbone(smoke_setup):
  b = smoke_setup.backbone
  assert b.model.config.mlp == 'cms'
  # Two fast levels (smoke: the `sleep_levels` backbone's) and the MLP.
  assert len(b.model.config.cms_levels) == 3
  # No fast expert is active before wake: fast levels add nothing yet.
  assert growth.active_slots(b.model_state, 0) == []
  assert growth.active_slots(b.model_state, 1) == []


def test_lora_copies_are_isolated(smoke_setup):
  """Copy 0's LoRA is the same whatever copy 1 trains on."""
  s = smoke_setup
  b = s.backbone
  cfg = knowledge_rows.lora_sft(s.config.finetune)
  texts = [p.context for p in s.eval]
  rows = [qa.text_rows(b, [t], 64) for t in texts]

  def fit(other):
    data = knowledge_rows._copy_data([rows[0], rows[other]], 2, 1, 1e-2,
                                     np.random.default_rng(0))
    return dream_sft.fit_copies(b.model, cfg, b.params, b.model_state,
                                jax.random.key(0), data)

  first, second = fit(1), fit(2)
  jax.tree.map(np.testing.assert_array_equal, lora.take(first, 0),
               lora.take(second, 0))
  moved = jax.tree.map(lambda a, c: float(jnp.max(jnp.abs(a - c))),
                       lora.take(first, 1), lora.take(second, 1))
  assert max(jax.tree.leaves(moved)) > 0  # the other copy did differ


def test_dream_unrewarded_reads_no_items_and_trains_only_the_new_expert(
    smoke_setup):
  s = smoke_setup
  b = s.backbone
  cfg = dreaming.DreamingConfig.from_dict(
      dict(s.config.dreaming.to_dict(), rehearse_learning_rate=1e-1))
  params, state, slot = growth.grow(b.params, b.model_state, 1,
                                    jax.random.key(1))
  tasks = knowledge_rows.edit_tasks(s, s.eval, with_items=False)
  assert tasks.items == {}   # nothing about the questions is there to read
  out = dreaming.dream_unrewarded(
      b.model, cfg, params, state, tasks, jax.random.key(2), level=1,
      slots=[slot], **s.ids)
  changed = jax.tree.map(
      lambda before, after: bool(np.any(np.asarray(before) != np.asarray(after))),
      params, out.params)
  for path, moved in jax.tree_util.tree_leaves_with_path(changed):
    name = jax.tree_util.keystr(path)
    if moved:  # only the slowest level's experts, never its dense MLP
      assert 'level_1' in name and 'dense' not in name, name
  assert any(jax.tree.leaves(changed)), 'rehearsal changed nothing'


def test_the_dreaming_ablation_rows_switch_only_their_knob(smoke_setup):
  """The two dreaming ablation rows (not in :smoke's run, which keeps one
  run of every code path) dream with `sleep`'s config but for one switch;
  tests/test_dreaming.py::test_ablation_switches checks what each does."""
  s = smoke_setup
  configs = knowledge_rows._sleep_configs(s, knowledge.ROWS)
  assert set(configs) == {'sleep', 'sleep_no_gradient_selection',
                          'sleep_no_random_expert'}
  base = configs['sleep']
  assert base == dreaming.DreamingConfig.from_dict(s.config.dreaming.to_dict())
  assert base.selection == 'gradient' and base.random_expert
  assert configs['sleep_no_gradient_selection'] == dataclasses.replace(
      base, selection='random')
  assert configs['sleep_no_random_expert'] == dataclasses.replace(
      base, random_expert=False)
  assert set(knowledge_rows._sleep_configs(s, s.config.rows)) == {'sleep'}


def test_validate_config_errors():
  config = knowledge_config.get_config('smoke')
  config.rows = ('base', 'sleepy')
  with pytest.raises(ValueError, match='sleepy'):
    knowledge.validate_config(config)
  config = knowledge_config.get_config('smoke')
  config.data.eval_passages = 0
  with pytest.raises(ValueError, match='data.eval_passages=0'):
    knowledge.validate_config(config)


def test_paper_config_validates():
  knowledge.validate_config(knowledge_config.get_config('paper'))


@pytest.mark.slow
def test_smoke_run_writes_every_output_and_resumes(tmp_path):
  config = knowledge_config.get_config('smoke')
  workdir = str(tmp_path)
  results = knowledge.run(config, workdir, log=lambda m: None)
  # Every row asked for (all but the two dreaming ablations), and only those.
  assert set(results['rows']) == set(config.rows)
  assert len(config.rows) == len(knowledge.ROWS) - 2
  for row in config.rows:
    for regime in knowledge.REGIMES:
      entry = results['rows'][row][regime]
      assert set(knowledge.GRADERS) <= set(entry), (row, regime)
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['rows'] == results['rows']
  report = open(os.path.join(workdir, 'report.md')).read()
  assert '| sleep_levels |' in report and 'paper single' in report
  assert '| sleep/single/0 |' in report  # the time table
  assert os.path.exists(os.path.join(workdir, 'plots', 'knowledge.png'))
  assert os.listdir(os.path.join(workdir, 'generators'))
  # A re-run keeps every unit (and their seconds) instead of recomputing.
  logs = []
  again = knowledge.run(config, workdir, log=logs.append)
  assert again['units'] == results['units']
  assert sum('kept from' in m for m in logs) == len(results['units'])


def test_plan_counts_the_work_and_the_memory_it_names(smoke_setup):
  config = knowledge_config.get_config('smoke')
  b = smoke_setup.backbone
  ft, width = config.finetune, config.widths.passage
  p = config.data.eval_passages
  units = knowledge_plan.ledger(config)
  assert list(units) == [knowledge.unit_name(*u) for u in knowledge._units(config)]
  # Fine-tuning on the passage: p copies x steps x batch x width (single),
  # cpt_steps x batch x width (cpt); nothing else trains in those units.
  assert units['passage_finetune/single/0'].train == (
      p * ft.steps * ft.batch_size * width)
  assert units['passage_finetune/cpt/0'].train == (
      ft.cpt_steps * ft.batch_size * width)
  assert units['base/both'].train == 0
  # SEAL pays for its generator once per seed, in its first unit.
  assert units['seal/single/0'].train > units['implications_finetune/single/0'].train
  assert units['seal/cpt/0'].train == units['implications_finetune/cpt/0'].train
  # chunk_size bounds the copies in flight, and the bytes with them.
  all_at_once = knowledge_plan.memory(config, b)
  config.finetune.chunk_size = 1
  one = knowledge_plan.memory(config, b)
  assert all_at_once['finetune_copies_in_flight'] == p
  assert one['finetune_copies_in_flight'] == 1
  assert one['finetune_copies_bytes'] == pytest.approx(
      all_at_once['finetune_copies_bytes'] / p)
  traced = knowledge_plan.trace_copy_step(config, b)
  assert traced['adapter_params'] == one['lora_params_per_copy']


def test_plan_writes_its_files_with_measured_costs(tmp_path):
  config = knowledge_config.get_config('smoke')
  text = knowledge_plan.write(config, str(tmp_path))
  with open(tmp_path / 'plan.json') as f:
    plan = json.load(f)
  assert plan['measured']['train_s_per_token'] > 0
  assert plan['this_machine_total_s'] > 0
  assert set(plan['accelerators']) == set(knowledge_plan.ACCELERATORS)
  assert '| sleep/single/0 |' in text
  assert (tmp_path / 'plan.md').read_text() == text
