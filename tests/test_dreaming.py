"""Dreaming (docs/design.md §5), the stage: ReST-EM, generation, ablations.

Isolated evaluation and rehearsal: test_dream_sft.py; selection:
test_dream_selection.py.
"""

import dataclasses

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax import dream_sft
from sleep_jax import dreaming
from sleep_jax import sampling
from sleep_jax.models import lora
from sleep_jax.sequences import join
from dreaming_setup import BOS, CFG, EOS, PAD, make_model, make_tasks
from tiny_models import teacher_with_fast_knowledge


def test_dream_hands_its_anchor_to_replay_and_rehearsal(monkeypatch):
  """dream(anchor=) reaches both the replay sampler and rehearsal's KL
  teacher (the two tests above check what each does with it)."""
  model, params, state, slot = make_model()
  accepted = {'tokens': np.ones((2, 7), np.int32),
              'mask': np.ones((2, 7), np.float32)}
  monkeypatch.setattr(dreaming, 'rest_em',
                      lambda *args, **kwargs: (None, [], accepted))
  seen = {}

  def fake_replay(*args, anchor=None, **kwargs):
    seen['replay'] = anchor
    return accepted

  def fake_rehearse(model, cfg, params, *args, replay=None, anchor=None,
                    **kwargs):
    seen['rehearse'] = (replay, anchor)
    return params, np.zeros((cfg.rehearse_steps,), np.float32)
  monkeypatch.setattr(dreaming, 'self_replay', fake_replay)
  monkeypatch.setattr(dreaming, 'rehearse', fake_rehearse)
  pre_wake = teacher_with_fast_knowledge(params, state)
  for anchor in (pre_wake, None):
    dreaming.dream(model, CFG, params, state, make_tasks(), jax.random.key(0),
                   level=1, slots=[slot], bos_id=BOS, eos_id=EOS, pad_id=PAD,
                   anchor=anchor)
    assert seen['replay'] is anchor
    assert seen['rehearse'][0] is accepted and seen['rehearse'][1] is anchor


def test_rest_em_m_step_trains_the_generator_that_generate_uses():
  """The M-step on (prompt, dream) rows makes that dream likelier under the
  dream LoRA, and greedy dreaming with the LoRA then produces it."""
  model, params, state, _ = make_model()
  tasks = make_tasks(num_contexts=3, seed=5)
  cfg = dataclasses.replace(CFG, temperature=0.0, max_new_tokens=6,
                            rest_steps=40, rest_batch_size=3,
                            rest_learning_rate=0.01, lora_rank=4)
  targets = np.tile(np.arange(5, 11, dtype=np.int32), (3, 1))  # one dream
  rows, masks = join(tasks.prompts, tasks.prompt_lengths, targets,
                     np.full(3, 6, np.int32), pad_id=PAD)
  rows, masks = np.asarray(rows), np.asarray(masks)
  # The loss covers the dream tokens only.
  np.testing.assert_array_equal(masks.sum(1), 6)
  fresh = lora.init(params, cfg.lora, jax.random.key(2))
  trained, last_loss = dream_sft.train_generator(
      model, cfg, params, state, fresh, rows, masks, np.random.default_rng(0))
  loss = lambda g: float(dream_sft.sft_loss(model, params, state, rows, masks,
                                            g, cfg))
  assert loss(trained) < 0.25 * loss(fresh) and np.isfinite(last_loss)

  def agreement(generator):
    dreams, _ = dreaming.generate(model, params, state, generator, tasks, cfg,
                                  jax.random.key(0), eos_id=EOS, pad_id=PAD)
    return np.mean(np.asarray(dreams)[::cfg.num_dreams] == targets)
  assert agreement(trained) == 1.0 and agreement(None) < 0.5


def run_stage(model, params, state, slot, tasks, cfg=CFG, seed=0):
  return dreaming.dream(model, cfg, params, state, tasks, jax.random.key(seed),
                        level=1, slots=[slot], bos_id=BOS, eos_id=EOS,
                        pad_id=PAD, seed=seed)


def test_the_stage_runs_and_compiles_once_across_sleep_cycles(compile_counter):
  model, params, state, slot = make_model()
  first = run_stage(model, params, state, slot, make_tasks(seed=1), seed=1)
  assert [r['round'] for r in first.rounds] == [0, 1]
  assert all(r['kept'] == 3 * 2 for r in first.rounds)
  # Round 0 rewarded some dreams, so the generator's M-step ran too.
  assert first.rounds[0]['rewarded'] > 0 and 'generator_loss' in first.rounds[0]
  assert len(first.accepted['tokens']) > 0
  with compile_counter() as compiles:
    second = run_stage(model, first.params, state, slot, make_tasks(seed=3),
                       seed=3)
  assert compiles() == 0, f'{compiles()} compilations in the second cycle'
  assert len(second.rounds) == 2 and second.rounds[0]['rewarded'] > 0


def test_ablation_switches():
  model, params, state, slot = make_model()
  tasks = make_tasks()
  off = run_stage(model, params, state, slot, tasks,
                  dataclasses.replace(CFG, enabled=False))
  assert off.rounds == [] and off.params is params
  assert len(off.accepted['tokens']) == len(off.accepted['mask']) == 0
  dreams, lengths = dreaming.generate(model, params, state, None, tasks, CFG,
                                      jax.random.key(4), eos_id=EOS, pad_id=PAD)
  random_cfg = dataclasses.replace(CFG, selection='random')
  data = dreaming.copy_data(tasks, random_cfg, np.asarray(dreams),
                            np.asarray(lengths), np.arange(12) // 4,
                            np.random.default_rng(0), bos_id=BOS, pad_id=PAD)
  kept, scores = dreaming.select(model, params, state, tasks, data, random_cfg,
                                 jax.random.key(0), np.random.default_rng(0))
  assert scores is None and len(set(kept.tolist())) == len(kept) == 6
  for random_expert in (True, False):
    cfg = dataclasses.replace(CFG, random_expert=random_expert)
    got = dreaming.generate(model, params, state, None, tasks, cfg,
                            jax.random.key(4), eos_id=EOS, pad_id=PAD)
    want = sampling.sample(
        model, params, np.repeat(tasks.prompts, 4, 0),
        np.repeat(tasks.prompt_lengths, 4, 0), max_new_tokens=6,
        rng=jax.random.key(4), temperature=1.0, eos_id=EOS, pad_id=PAD,
        model_state=state, random_expert=random_expert)
    np.testing.assert_array_equal(got[0], want.tokens)


def test_random_expert_injection_changes_the_dreams():
  """Three trained experts in level 0 (top-1 routing): greedy dreams differ
  with the switch on; with the experts at zero (the base model's) they
  cannot."""
  model, params, state, _ = make_model()
  state = {'cms': {**state['cms'],
                   'level_0': jnp.array([True, True, True, False])}}
  rng = np.random.default_rng(0)
  flat = traverse_util.flatten_dict(params, sep='/')
  flat = {k: (jnp.asarray(0.5 * rng.normal(size=v.shape), v.dtype)
              if 'level_0/lowrank' in k or 'level_0/router' in k else v)
          for k, v in flat.items()}
  trained = traverse_util.unflatten_dict(flat, sep='/')
  tasks = make_tasks(num_contexts=4)
  greedy = dataclasses.replace(CFG, temperature=0.0, max_new_tokens=8)

  def dreams(p, random_expert):
    cfg = dataclasses.replace(greedy, random_expert=random_expert)
    return np.asarray(dreaming.generate(model, p, state, None, tasks, cfg,
                                        jax.random.key(4), eos_id=EOS,
                                        pad_id=PAD)[0])
  assert not np.array_equal(dreams(trained, True), dreams(trained, False))
  np.testing.assert_array_equal(dreams(params, True), dreams(params, False))


@pytest.mark.parametrize('overrides, message', [
    (dict(keep_top=3, keep_random=2, num_dreams=4), 'dreaming.keep_top=3'),
    (dict(template='poem'), 'dreaming.template'),
    (dict(selection='best'), 'dreaming.selection'),
    (dict(tau='f1'), 'dreaming.tau'),
    (dict(rounds=-1), 'dreaming.rounds=-1'),
    (dict(eval_steps=0), 'dreaming.eval_steps=0'),
    (dict(lora_rank=0), 'dreaming.lora_rank=0'),
    (dict(temperature=-1.0), 'dreaming.temperature=-1.0'),
    (dict(rehearse_replay=-0.5), 'dreaming.rehearse_replay=-0.5'),
])
def test_bad_knobs_fail_at_config_time(overrides, message):
  with pytest.raises(ValueError, match=message):
    dreaming.DreamingConfig(**overrides)
  with pytest.raises(ValueError, match='unknown keys'):
    dreaming.DreamingConfig.from_dict({'num_dream': 3})
