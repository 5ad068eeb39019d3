"""No held-out item reaches any training, reward or selection path.

Every person's questions are split (sleep_jax.studies.facts): held-out
forms are never written in a passage about them and only the final
evaluation asks them; probe forms are the only items a reward (dreaming's
tau) may score. These tests check the split in the data (by id and by
text); tests/test_continual.py checks the code: a main-job run whose
held-out items are replaced by garbage trains exactly the same parameters.
"""

import re

import numpy as np

from experiments.configs import continual as continual_config
from sleep_jax.studies import continual
from sleep_jax.studies import continual_checks
from sleep_jax.studies import fact_world
from sleep_jax.studies import facts
from sleep_jax.studies import world_tfds

WORLD = world_tfds.WorldConfig(seed=5, base_people=6, sessions=2,
                               people_per_session=3, passages_per_person=3)


def _texts(tokenizer, rows):
  return [tokenizer.decode([int(t) for t in row if t > 0]) for row in rows]


def _item_texts(tokenizer, encoded):
  """Each encoded item's prompt + answer, decoded from its arrays."""
  out = []
  for inputs, targets, answer in zip(encoded['inputs'], encoded['targets'],
                                     encoded['answer_mask']):
    last = int(np.flatnonzero(answer)[-1])
    out.append(tokenizer.decode(
        [int(t) for t in inputs[1:last + 1]] + [int(targets[last])]))
  return out


def _squash(text):
  return re.sub(r'\s+', ' ', text).strip()


def test_held_out_forms_are_never_in_a_persons_passages():
  people = facts.make_people(40, 1)
  for person in people:
    held = facts.held_out_items(person)
    probe = facts.probe_items(person)
    assert len(held) == 3 * facts.HELD_OUT_FORMS and len(probe) == 9
    assert not {i.id for i in held} & {i.id for i in probe}
    written = facts.passage_sentences(person)
    written += [s for k in range(20)
                for s in facts.passages(person, np.random.default_rng(k))]
    for item in held:
      assert not any(item.prompt + item.answer in s for s in written), item
    for item in probe:  # probe items are sentences of the passages
      assert item.prompt + item.answer + '.' in facts.passage_sentences(person)
  # Every form is some person's held-out form and some other's passage form,
  # so the model has read every form (about other people).
  forms = {(a, f) for p in people for a, fs in facts.held_out_forms(p).items()
           for f in fs}
  assert len(forms) == 15


def test_world_records_split_held_out_and_probe_by_id(tmp_path):
  world_tfds.build(str(tmp_path), WORLD)
  source = world_tfds.load(str(tmp_path), WORLD)
  for session in range(WORLD.sessions + 1):
    records = world_tfds.session_records(source['questions'], session)
    held = {r['item_id'] for r in records if r['split'] == 'held_out'}
    probe = {r['item_id'] for r in records if r['split'] == 'probe'}
    assert held and probe and not held & probe
    texts = {r['prompt'] + r['answer'] for r in records
             if r['split'] == 'held_out'}
    passages = world_tfds.session_records(source['passages'], session)
    assert not any(t in p['text'] for t in texts for p in passages)


def _smoke_config():
  config = continual_config.get_config('smoke')
  config.mesh.data = 1  # one device: the suite fakes 8
  config.seeds = (0,)
  return config


def test_no_held_out_text_in_any_training_row_or_reward_item(tmp_path):
  config = _smoke_config()
  parsed = continual_checks.validate_config(config)
  world = continual.load_world(config, parsed, str(tmp_path),
                               str(tmp_path / 'tokenizer.model'))
  tok = world.tokenizer
  source = world_tfds.load(str(tmp_path / 'data'), parsed['world'])
  held = [r['prompt'] + r['answer'] for t in range(config.sessions + 1)
          for r in world_tfds.session_records(source['questions'], t)
          if r['split'] == 'held_out']
  assert len(held) == 3 * facts.HELD_OUT_FORMS * (
      config.world.base_people +
      config.sessions * config.world.people_per_session)
  # What trains: base rows, the replay_all buffer, every session's wake rows
  # (also KS's replay prompts) and its dream contexts.
  trained = _texts(tok, world.base_rows['inputs'])
  trained += _texts(tok, world.base_replay['inputs'])
  for session in world.sessions:
    trained += _texts(tok, session.rows['inputs'])
    trained += _texts(tok, session.tasks.prompts)
  trained = [_squash(t) for t in trained]
  assert trained and not [h for h in held
                          if any(_squash(h) in t for t in trained)]
  # What rewards: dreaming's tau items are probe items, none held out.
  rewarded = [_squash(t) for s in world.sessions
              for per_context in _stack_items(s.tasks.items)
              for t in _item_texts(tok, per_context)]
  assert rewarded and not {_squash(h) for h in held} & set(rewarded)
  # And the evaluation asks exactly the held-out items.
  asked = [_squash(t) for s in world.sessions
           for t in _item_texts(tok, s.items)]
  asked += [_squash(t) for t in _item_texts(tok, world.base_items)]
  assert sorted(asked) == sorted(_squash(h) for h in held)


def _stack_items(items):
  """Per context, its items as one encoded batch."""
  return [{k: v[c] for k, v in items.items()}
          for c in range(len(items['inputs']))]


def test_dreaming_study_rewards_probe_items_only():
  from experiments.configs import dreaming as dreaming_config
  from sleep_jax import dreaming
  from sleep_jax.studies import dreaming as dreaming_study
  config = dreaming_config.get_config('smoke')
  world = fact_world.build(config)
  session = world.sessions[0]
  cfg = dreaming.DreamingConfig.from_dict(config.dreaming.to_dict())
  tasks = dreaming_study.make_tasks(world, session, cfg,
                                    int(config.prompt_width), config.seed)
  tok = world.tokenizer
  rewarded = {_squash(t) for per_context in _stack_items(tasks.items)
              for t in _item_texts(tok, per_context)}
  held = {_squash(t) for t in _item_texts(tok, world.recall(session))}
  probe = {_squash(t) for t in _item_texts(tok, world.probe(session))}
  assert rewarded == probe and held and not rewarded & held
  contexts = [_squash(t) for t in _texts(tok, tasks.prompts)]
  assert not [h for h in held if any(h in c for c in contexts)]
  trained = [_squash(t) for t in _texts(tok, world.passages(world.base)
                                        ['inputs'])]
  base_held = {_squash(t) for t in _item_texts(tok, world.recall(world.base))}
  assert not [h for h in base_held if any(h in t for t in trained)]
