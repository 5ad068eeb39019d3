"""The world as a TFDS dataset: written by the builder, read back with grain."""

import os

import numpy as np
import pytest

from sleep_jax.studies import facts
from sleep_jax.studies import world_tfds

WORLD = world_tfds.WorldConfig(seed=3, base_people=5, sessions=2,
                               people_per_session=2, passages_per_person=2)


def test_builder_writes_what_the_generator_says_and_grain_reads_it(tmp_path):
  path = world_tfds.build(str(tmp_path), WORLD)
  assert any(name.endswith('.array_record') or 'array_record' in name
             for name in __import__('os').listdir(path))
  sources = world_tfds.load(str(tmp_path), WORLD)
  assert len(sources['passages']) == 9 * 2 and len(sources['questions']) == 9 * 15
  # Reference: the Python generator itself, independent of TFDS.
  people = facts.make_people(9, seed=3)
  for session, expected in ((0, people[:5]), (1, people[5:7]), (2, people[7:])):
    questions = world_tfds.session_records(sources['questions'], session)
    for split, items in (('held_out', facts.held_out_items),
                         ('probe', facts.probe_items)):
      assert sorted((q['item_id'], q['prompt'], q['answer'])
                    for q in questions if q['split'] == split) == sorted(
                        item for p in expected for item in items(p))
    passages = world_tfds.session_records(sources['passages'], session)
    assert {p['person'] for p in passages} == {p.name for p in expected}
    for record in passages:
      person = next(p for p in expected if p.name == record['person'])
      for _, value in person.attributes:  # every fact is in the passage
        assert value in record['text']
  # Paraphrase variety across a person's passages, somewhere in the world.
  texts = {}
  for r in world_tfds.session_records(sources['passages'], 0):
    texts.setdefault(r['person'], set()).add(r['text'])
  assert max(map(len, texts.values())) == 2


def test_same_config_same_records_and_no_download(tmp_path):
  a = world_tfds.load(world_tfds.build(str(tmp_path / 'a'), WORLD) and
                      str(tmp_path / 'a'), WORLD)
  b = world_tfds.load(world_tfds.build(str(tmp_path / 'b'), WORLD) and
                      str(tmp_path / 'b'), WORLD)
  for split in ('passages', 'questions'):
    assert [a[split][i] for i in range(len(a[split]))] == [
        b[split][i] for i in range(len(b[split]))]
  other = world_tfds.WorldConfig(seed=4, base_people=5, sessions=2,
                                 people_per_session=2, passages_per_person=2)
  with pytest.raises(Exception):  # never generated: load must not build it
    world_tfds.load(str(tmp_path / 'a'), other)


def test_bad_world_config_names_the_key():
  with pytest.raises(ValueError, match='world.people_per_session=0'):
    world_tfds.WorldConfig(people_per_session=0)
  assert np.all([world_tfds.WorldConfig(seed=s).name !=
                 world_tfds.WorldConfig(seed=s + 1).name for s in range(3)])


def test_a_damaged_dataset_is_rebuilt(tmp_path):
  """Record files that do not read back (cut short, flipped bytes) are
  reported, moved aside and generated again from the seed: the records
  equal the undamaged ones."""
  data_dir = str(tmp_path)
  expected = world_tfds.read_sessions(data_dir, WORLD)
  path = world_tfds.build(data_dir, WORLD)
  [record_file] = [os.path.join(path, n) for n in os.listdir(path)
                   if 'questions.array_record' in n]
  with open(record_file, 'r+b') as f:
    f.truncate(os.path.getsize(record_file) // 2)
  lines = []
  assert world_tfds.read_sessions(data_dir, WORLD, lines.append) == expected
  assert len(lines) == 1 and 'does not read back' in lines[0]
  assert any('.bad-' in n for n in os.listdir(os.path.dirname(path)))
