"""The toy world the studies share: fictional people as token data, a base LM.

`build(config)` draws the people (a base population plus sessions of new
people, sleep_jax.studies.facts), trains a SentencePiece tokenizer on
every passage sentence of the world, and encodes what the studies need:
passage rows for training and wake, held-out closed-book items for
evaluation and probe items for rewards (never the other way round).
`train_base` trains the model on the base population, so it knows the
language of the world but none of the people who arrive later;
`restore_or_train` keeps it on disk, so a study re-run (or resumed after a
crash) with the same base config does not train it again.

Config keys read: world_seed, seed, data.{seq_len, tokenizer_vocab_size},
stream.{base_people, sessions, people_per_session, batch_size},
base_train_steps, optimizer.*, model.vocab_size.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sleep_jax import eval as eval_lib
from sleep_jax import growth
from sleep_jax import metrics as metrics_lib
from sleep_jax import sharding
from sleep_jax import training
from sleep_jax.checkpoints import integrity
from sleep_jax.data import pipeline
from sleep_jax.data.tokenizers import SentencePieceTokenizer
from sleep_jax.studies import facts
from sleep_jax.studies import results as results_lib


@dataclasses.dataclass
class FactWorld:
  tokenizer: SentencePieceTokenizer
  base: list[facts.Person]
  sessions: list[list[facts.Person]]
  seq_len: int

  def passages(self, people) -> dict[str, np.ndarray]:
    """Every passage sentence about `people` as rows: inputs, targets, mask
    (no held-out form: those are the evaluation's)."""
    return self.rows([s for p in people for s in facts.passage_sentences(p)])

  def documents(self, people, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One row per person: their passage, then one of its facts restated in a
    random passage form. On people met nowhere else, the restatement can only
    be predicted by copying from the passage: this teaches in-context use."""
    texts = []
    for person in people:
      attribute, _ = person.attributes[rng.integers(len(person.attributes))]
      restated = facts.paraphrase(person, attribute, rng)
      texts.append(' '.join(facts.passages(person, rng) + [restated]))
    return self.rows(texts)

  def rows(self, texts) -> dict[str, np.ndarray]:
    """Each text as one next-token row (BOS, EOS): inputs, targets, mask."""
    rows = [self.tokenizer.encode(t, add_bos=True, add_eos=True) for t in texts]
    if max(map(len, rows)) > self.seq_len + 1:
      raise ValueError(f'a row has {max(map(len, rows))} tokens; raise '
                       f'data.seq_len (now {self.seq_len}).')
    examples = [pipeline.pad_document(np.asarray(row), self.seq_len + 1,
                                      self.tokenizer.pad_id) for row in rows]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  def recall(self, people) -> dict[str, np.ndarray]:
    """Held-out closed-book items about `people` (evaluation only; see
    sleep_jax.eval)."""
    return eval_lib.encode_items(
        self.tokenizer,
        facts.pairs([it for p in people for it in facts.held_out_items(p)]),
        self.seq_len)

  def probe(self, people) -> dict[str, np.ndarray]:
    """Probe items about `people`: the only ones a reward may score."""
    return eval_lib.encode_items(
        self.tokenizer,
        facts.pairs([it for p in people for it in facts.probe_items(p)]),
        self.seq_len)


def build(config) -> FactWorld:
  stream = config.stream
  people = facts.make_people(
      stream.base_people + stream.sessions * stream.people_per_session,
      config.world_seed)
  base, new = people[:stream.base_people], people[stream.base_people:]
  sessions = [new[i * stream.people_per_session:
                  (i + 1) * stream.people_per_session]
              for i in range(stream.sessions)]
  tokenizer = SentencePieceTokenizer.train(
      [s for p in people for s in facts.passage_sentences(p)],
      config.data.tokenizer_vocab_size)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f'the tokenizer has {tokenizer.vocab_size} ids but '
                     f'model.vocab_size={config.model.vocab_size}; raise it.')
  return FactWorld(tokenizer, base, sessions, int(config.data.seq_len))


def batches(data, batch_size: int, steps: int, rng: np.random.Generator):
  """`steps` batches of rows drawn uniformly (with replacement if few rows)."""
  n = len(data['inputs'])
  for _ in range(steps):
    idx = rng.choice(n, size=batch_size, replace=n < batch_size)
    yield {k: jnp.asarray(v[idx]) for k, v in data.items()}


def train_base(model, config, data, mesh, rules, experts_per_level=()):
  """(params, model_state) after `config.base_train_steps` AdamW steps.

  `experts_per_level[l]` low-rank experts of CMS level l are grown first, so
  the base model trains them too (a level with several active experts).
  """
  steps = int(config.base_train_steps)
  tx, schedule = training.make_optimizer(config.optimizer, steps)
  tokens = jnp.zeros((config.stream.batch_size, config.data.seq_len), jnp.int32)
  state, shardings = sharding.init_sharded(
      functools.partial(training.create_train_state, model, tx), mesh, rules,
      jax.random.key(config.seed), tokens)
  for level, count in enumerate(experts_per_level):
    for i in range(count):
      params, model_state, _ = growth.grow(
          state.params, state.model_state, level,
          jax.random.fold_in(jax.random.key(config.seed + 1), 16 * level + i))
      state = dataclasses.replace(state, params=params, model_state=model_state)
  step = training.compile_train_step(model, tx, schedule, shardings, mesh, rules)
  progress = metrics_lib.Progress(steps, what='base step')
  rng = np.random.default_rng(config.seed)
  for i, batch in enumerate(batches(data, config.stream.batch_size, steps, rng)):
    state, metrics = step(state, batch)
    if (i + 1) % 50 == 0 or i + 1 == steps:
      metrics_lib.check_finite(i + 1, {'loss': metrics['loss']})
    progress.update(i + 1, {'loss': metrics['loss']}, force=i + 1 == steps)
  return state.params, state.model_state


def base_dir(workdir: str, config, not_base_keys) -> str:
  """workdir/base/<config_hash of every top-level key of `config` but
  `not_base_keys`, and the world's text format>: where `restore_or_train`
  keeps that base model."""
  tree = {k: v for k, v in config.to_dict().items() if k not in not_base_keys}
  return os.path.join(workdir, 'base', results_lib.config_hash(
      {**tree, 'world_format': facts.FORMAT_VERSION}))


def _checksums_path(directory: str) -> str:
  return os.path.join(directory, 'checksums.json')


def _read_checksums(directory: str, strict: bool = True) -> dict:
  """checksums.json ({} if there is none: a cache from before checksums).
  One that does not read back is damage like any other (CorruptCheckpoint-
  Error), or {} if not `strict` (about to be rewritten)."""
  path = _checksums_path(directory)
  if not os.path.exists(path):
    return {}
  try:
    return metrics_lib.read_json(path)
  except ValueError as e:
    if not strict:
      return {}
    raise integrity.CorruptCheckpointError(str(e)) from e


def _record_checksums(directory: str, **entries) -> None:
  metrics_lib.write_json(_checksums_path(directory),
                         {**_read_checksums(directory, strict=False),
                          **entries})


def checked_file(directory: str, name: str, log=print) -> bool:
  """Whether `directory/name` (e.g. the base model's tokenizer) is there and
  whole: its SHA-256 equals the one recorded when it was written. A damaged
  one makes the whole `directory` (the model trained with it) move aside.
  A file with no record (a cache from before checksums) is recorded now."""
  path = os.path.join(directory, name)
  if not os.path.exists(path):
    return False
  try:
    recorded = _read_checksums(directory).get('files', {})
  except integrity.CorruptCheckpointError as e:
    results_lib.set_aside(directory, log, 'bad', str(e))
    os.makedirs(directory)
    return False
  digest = integrity.file_sha256(path)
  if name not in recorded:
    record_file(directory, name)
  elif recorded[name] != digest:
    results_lib.set_aside(directory, log, 'bad',
                          f'{name} does not match its checksum')
    os.makedirs(directory)
    return False
  return True


def record_file(directory: str, name: str) -> None:
  """Records the checksum of `directory/name`, which `checked_file` checks."""
  files = dict(_read_checksums(directory, strict=False).get('files', {}))
  files[name] = integrity.file_sha256(os.path.join(directory, name))
  _record_checksums(directory, files=files)


def restore_or_train(directory: str, train: Callable[[], tuple], log=print):
  """(params, model_state) from `directory` if a run saved them there, else
  `train()`'s, saved there first.

  Name `directory` by what decides the model (`base_dir`, or `config_hash`
  of the base config). Orbax writes to a temporary directory and renames it
  when done, so a crash mid-save leaves nothing to restore, not half a model.
  A checksum of every array (`checksums.json`) is compared on restore: a
  damaged or unreadable model is moved aside and trained again.
  """
  path = os.path.join(directory, 'params')
  checkpointer = ocp.StandardCheckpointer()
  try:
    if os.path.exists(path):
      try:
        restored = checkpointer.restore(path)
        expected = _read_checksums(directory).get('arrays')
        integrity.verify(restored, expected, path)
        log(f'reusing the base model in {directory}')
        if expected is None:
          _record_checksums(directory, arrays=integrity.checksums(restored))
        return restored['params'], restored['model_state']
      except Exception as e:  # pylint: disable=broad-except
        results_lib.set_aside(
            path, log, 'bad',
            f'{type(e).__name__}: {" ".join(str(e).split())[:160]}')
    params, model_state = jax.device_get(train())
    tree = {'params': params, 'model_state': model_state}
    # What a save cut short (a full disk, a kill) left behind.
    for leftover in glob.glob(f'{path}.orbax-checkpoint-tmp*'):
      shutil.rmtree(leftover, ignore_errors=True)
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    _record_checksums(directory, arrays=integrity.checksums(tree))
    return params, model_state
  finally:
    checkpointer.close()
