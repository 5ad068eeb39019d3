"""The fictional-people world as a TFDS dataset (array_record, no TensorFlow).

`build(data_dir, config)` writes it once with a real TFDS builder;
`load(data_dir, config)` reads it back with `tfds.data_source` (random
access, what grain consumes) and never downloads. Two splits:

* `passages`: `passages_per_person` biographies per person, each fact in a
  randomly chosen paraphrase (sleep_jax.studies.facts);
* `questions`: the closed-book (prompt, answer) items of every person, each
  with its `item_id` and its `split`: 'held_out' (a form no passage about
  that person uses; final evaluation only) or 'probe' (a passage form; the
  only items a reward or selection signal may score). See
  sleep_jax.studies.facts.

Every record carries `session`: 0 for the base population, 1..T for the
people who arrive in session t. Same `WorldConfig` -> same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys

from absl import logging
import grain
import numpy as np
import tensorflow_datasets as tfds

from sleep_jax.studies import facts
from sleep_jax import multihost
from sleep_jax.studies import results as results_lib


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  seed: int = 0
  base_people: int = 300
  sessions: int = 4
  people_per_session: int = 16
  passages_per_person: int = 3

  def __post_init__(self):
    for key in ('base_people', 'people_per_session', 'passages_per_person'):
      if getattr(self, key) < 1:
        raise ValueError(f'world.{key}={getattr(self, key)} must be >= 1.')
    if self.sessions < 0:
      raise ValueError(f'world.sessions={self.sessions} must be >= 0.')

  @property
  def name(self) -> str:
    """The TFDS config name: every field, so a change never reuses data."""
    return (f's{self.seed}_b{self.base_people}_t{self.sessions}'
            f'x{self.people_per_session}_p{self.passages_per_person}')

  def people(self) -> list[tuple[int, facts.Person]]:
    """(session, person) for everyone, base population first."""
    total = self.base_people + self.sessions * self.people_per_session
    people = facts.make_people(total, self.seed)
    return [(0 if i < self.base_people else
             1 + (i - self.base_people) // self.people_per_session, p)
            for i, p in enumerate(people)]


class _BuilderConfig(tfds.core.BuilderConfig):

  def __init__(self, world: WorldConfig):
    super().__init__(name=world.name, version=tfds.core.Version('2.0.0'),
                     description='fictional people, passages and questions')
    self.world = world


class FactWorld(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of the world; pass `config=_BuilderConfig(world)`."""

  VERSION = tfds.core.Version('2.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'session': np.int32, 'person': text, 'text': text,
            'prompt': text, 'answer': text, 'attribute': text,
            'item_id': text, 'split': text}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the world is generated
    return {split: self._generate_examples(split)
            for split in ('passages', 'questions')}

  def _generate_examples(self, split: str):
    return self._passages() if split == 'passages' else self._questions()

  def _passages(self):
    world = self.builder_config.world
    for i, (session, person) in enumerate(world.people()):
      rng = np.random.default_rng([world.seed, i])
      for k in range(world.passages_per_person):
        yield f'{i}-{k}', {'session': session, 'person': person.name,
                           'text': ' '.join(facts.passages(person, rng)),
                           'prompt': '', 'answer': '', 'attribute': '',
                           'item_id': '', 'split': ''}

  def _questions(self):
    for i, (session, person) in enumerate(self.builder_config.world.people()):
      for split, items in (('held_out', facts.held_out_items(person)),
                           ('probe', facts.probe_items(person))):
        for item in items:
          attribute, form = item.id.split('/')[-2:]
          yield f'{i}-{attribute}-{form}', {
              'session': session, 'person': person.name, 'text': '',
              'prompt': item.prompt, 'answer': item.answer,
              'attribute': attribute, 'item_id': item.id, 'split': split}


def build(data_dir: str, world: WorldConfig) -> str:
  """Generates the dataset under `data_dir` unless it is there; its path."""
  tfds.disable_progress_bar()  # the run's own progress lines say enough
  # TFDS announces a config it does not list (every world is one) and
  # prints "Downloading and preparing" banners: noise for a dataset made
  # here from a seed, unless INFO logs were asked for.
  quiet = logging.get_verbosity() < logging.INFO
  with contextlib.redirect_stdout(io.StringIO() if quiet else sys.stdout):
    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR if quiet else level)
    try:
      builder = FactWorld(data_dir=data_dir, config=_BuilderConfig(world),
                          file_format='array_record')
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    finally:
      logging.set_verbosity(level)
  return os.fspath(builder.data_path)


def load(data_dir: str, world: WorldConfig) -> dict:
  """{'passages', 'questions'}: random-access sources (never downloads)."""
  return tfds.data_source(f'fact_world/{world.name}', data_dir=data_dir,
                          download=False)


def session_records(source, session: int) -> list[dict]:
  """The records of one session, through a grain pipeline, as str fields."""
  ds = grain.MapDataset.source(source).filter(
      lambda r: int(r['session']) == session).map(_decoded)
  return [r for r in ds if r is not None]


def _decoded(record) -> dict:
  return {k: v.decode() if isinstance(v, bytes) else int(v)
          for k, v in record.items()}


def read_sessions(data_dir: str, world: WorldConfig, log=print):
  """(passages, questions): every session's records (session 0: the base
  population), building the dataset first if needed.

  A dataset on disk that does not read back (truncated or damaged record
  files, a missing dataset_info.json) is moved aside, reported and built
  again: it is generated from the world's seed, so nothing is lost.
  """
  for attempt in (0, 1):
    # Built once (process 0) into the shared data_dir; then every process
    # finds it there.
    multihost.once(f'world:{world.name}:{attempt}',
                   lambda: build(data_dir, world))
    path = build(data_dir, world)
    try:
      source = load(data_dir, world)
      return tuple([session_records(source[split], t)
                    for t in range(world.sessions + 1)]
                   for split in ('passages', 'questions'))
    except Exception as e:  # pylint: disable=broad-except
      if attempt:
        raise
      results_lib.set_aside(
          path, log, 'bad', f'the world dataset does not read back: '
          f'{type(e).__name__}: {" ".join(str(e).split())[:160]}')
