"""The wake/sleep lifecycle over a stream of sessions.

docs/design.md §1 and §10.1.

One `Lifecycle` runs one method (`sleep_jax.methods`) with one seed through
every session. Each cycle reads the same for every method:

* wake: the session's passages arrive (`method.wake`): CMS methods grow a
  fast-level expert and learn them online, the fine-tuning baselines train
  on the same rows for the same number of steps;
* sleep (`method.sleep`): for Sleep, Knowledge Seeding of the fast level into
  a new slow-level expert, then dreaming rehearsed into it; whatever the
  method does instead for the others;
* evaluate: closed-book recall on every session so far, and on the base
  population, of `method.evaluated(...)`.

Each cycle ends with one Orbax step (`checkpoints/<method>/seed_<s>/<cycle>`)
holding the model (and the method's own state: LoRA adapter, EWC Fisher,
dream generator) and, as metadata, its lineage and every cycle's record so
far. `run()` resumes from the newest readable step: a step that fails to
restore is reported, moved aside, and the one before it is used. Every cycle
starts from host arrays and draws its randomness from (seed, cycle), so a
resumed run computes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import zlib
from typing import Any, Callable, Mapping

import jax
import numpy as np

from sleep_jax import dreaming
from sleep_jax import eval as eval_lib
from sleep_jax import growth
from sleep_jax import methods as methods_lib
from sleep_jax import metrics as metrics_lib
from sleep_jax import training
from sleep_jax.baselines import BaselineConfig
from sleep_jax.checkpoints.manager import Checkpointer
from sleep_jax.seeding import SeedingConfig

@dataclasses.dataclass
class Session:
  """What one session brings, as arrays.

  rows: wake rows (inputs / targets / mask) of its passages;
  tasks: dreaming contexts (one passage per person) with their recall items;
  items: closed-book recall items of its people (`eval.encode_items`).
  """
  rows: dict
  tasks: dreaming.Tasks
  items: dict


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a lifecycle needs besides its method and seed."""
  model: Any
  sessions: list
  base_items: dict
  wake_steps: int
  batch_size: int
  seeding: SeedingConfig
  dreaming: dreaming.DreamingConfig
  baselines: BaselineConfig
  token_ids: Mapping[str, int]        # bos_id, eos_id, pad_id
  decode: Callable[[list[int]], str]
  judge: Any
  mesh: Any
  rules: Any
  lineage: Mapping[str, Any]          # config_hash, code_version
  base_replay: dict | None = None     # base rows: the replay_all oracle's
  compute_steps: int = 0              # finetune_compute's steps per session
  # Weight of the wake anchor (JSD to the pre-wake model on its own BOS
  # samples during wake) for the anchored CMS methods; 0 = off.
  wake_anchor_weight: float = 0.0
  # Per method, overrides of `seeding` from the config (`sleep_per_method`),
  # applied after the method's own (`Method.seeding`).
  method_seeding: Mapping[str, Mapping[str, Any]] = dataclasses.field(
      default_factory=dict)
  # A wake loss at or above ln V for this many steps in a row, after it
  # was below, stops the run (`training.divergence`).
  divergence_steps: int = 10
  fast_level: int = 0
  slow_level: int = 1


class Lifecycle:
  """One method, one seed, every session; see the module docstring."""

  def __init__(self, name: str, seed: int, settings: Settings, directory: str,
               log: Callable[[str], None] = print):
    if name not in methods_lib.METHODS:
      raise ValueError(f'Unknown method {name!r}; valid: '
                       f'{list(methods_lib.METHODS)}.')
    self.name, self.seed, self.s = name, seed, settings
    self.method = methods_lib.METHODS[name]
    overrides = dict(settings.method_seeding.get(name, {}))
    clash = sorted(set(overrides) & set(self.method.seeding))
    if clash:
      raise ValueError(f'sleep_per_method.{name} sets {clash}, which the '
                       f'method itself fixes ({dict(self.method.seeding)}); '
                       'drop them.')
    self.seeding = dataclasses.replace(
        settings.seeding, **{**self.method.seeding, **overrides})
    self.method.check(settings)
    self.directory = directory
    self.log = log

  # ------------------------------------------------------------- state ---

  def initial_state(self, params, model_state) -> dict:
    """The pytree saved every cycle; its structure never changes."""
    extra = self.method.init_extra(params, jax.random.key(self.seed), self.s)
    return jax.device_get({'params': params, 'model_state': model_state,
                           'extra': extra})

  def eval_params(self, state):
    return self.method.evaluated(state['params'], state['extra'], self.s)

  # ------------------------------------------------------------- cycle ---

  def cycle(self, state: dict, t: int) -> tuple[dict, dict]:
    """Wake, sleep and evaluate on session t; returns (state, the cycle's
    record)."""
    t0 = time.perf_counter()
    session = self.s.sessions[t]
    probe_items = {k: np.reshape(v, (-1, v.shape[-1]))
                   for k, v in session.tasks.items.items()}

    def probe():
      """Recall now: the session's and the base population's held-out items,
      and the session's probe items (forms its passages used)."""
      evaluated = self.method.evaluated(c.params, c.extra, self.s)
      recall = lambda items: eval_lib.recall_accuracy(
          self.s.model, evaluated, c.model_state, items)
      return {'session': recall(session.items),
              'base': recall(self.s.base_items),
              'session_probe': recall(probe_items)}

    c = methods_lib.Cycle(
        lifecycle=self, t=t,
        key=jax.random.fold_in(jax.random.key(self.seed), 1000 + t),
        host=np.random.default_rng(
            [self.seed, t, zlib.crc32(self.method.wake_kind.encode())]),
        params=state['params'], model_state=state['model_state'],
        extra=dict(state['extra']),
        record={'cycle': t, 'grown': [], 'reset': [], 'sleep': {},
                'stages': {}},
        probe=probe)
    self.method.wake(c)
    self.method.sleep(c)
    state = jax.device_get({'params': c.params, 'model_state': c.model_state,
                            'extra': c.extra})
    record = c.record
    evaluated = self.eval_params(state)
    record['acc'] = [eval_lib.recall_accuracy(self.s.model, evaluated,
                                              state['model_state'], s.items)
                     for s in self.s.sessions[:t + 1]]
    record['base_acc'] = eval_lib.recall_accuracy(
        self.s.model, evaluated, state['model_state'], self.s.base_items)
    record['params'] = (
        growth.params_in_use(state['params'], state['model_state'])
        + self.method.extra_param_count(state['extra']))
    record['seconds'] = time.perf_counter() - t0
    return state, record

  # -------------------------------------------------------- divergence ---

  def _learning_rate(self, stage: str) -> tuple[str, float]:
    """(config key, value) of the rate this method trains with in `stage`:
    what a user lowers when that stage diverges."""
    if stage == 'wake':
      return self.method.wake_learning_rate(self.s)
    if stage == 'consolidation':
      key = ('sleep_per_method.{}.learning_rate'.format(self.name)
             if 'learning_rate' in self.s.method_seeding.get(self.name, {})
             else 'sleep.learning_rate')
      return key, self.seeding.learning_rate
    return ('dreaming.rehearse_learning_rate',
            self.s.dreaming.rehearse_learning_rate)

  def _diverged(self, stage: str, why: str) -> training.DivergenceError:
    key, value = self._learning_rate(stage)
    return training.DivergenceError(
        f'{self.name} (seed {self.seed}) diverged in {stage}: {why}; lower '
        f'{key} (now {value}) and run again.')

  def check_losses(self, stage: str, losses) -> None:
    """Raises DivergenceError naming this method's rate if `losses` (one per
    step) diverged (`training.divergence`)."""
    why = training.divergence(losses, self.s.model.config.vocab_size,
                              self.s.divergence_steps)
    if why:
      raise self._diverged(stage, why)

  @contextlib.contextmanager
  def diverging(self, stage: str):
    """Names this method's rate in a NaN/inf a stage's own check raises."""
    try:
      yield
    except FloatingPointError as e:
      if isinstance(e, training.DivergenceError):
        raise
      raise self._diverged(stage, str(e).split('.')[0]) from e

  # --------------------------------------------------------------- run ---

  def run(self, params, model_state, on_cycle=None) -> list[dict]:
    """Every session, resuming from the newest readable checkpoint; returns
    the per-cycle records. After each new cycle, one log line; `on_cycle(
    record)` is called first, and a string it returns ends that line."""
    initial = self.initial_state(params, model_state)
    ckpt = Checkpointer(self.directory, max_to_keep=None)
    try:
      state, records = self._restore(ckpt, initial)
      for t in range(len(records), len(self.s.sessions)):
        compiling = metrics_lib.compile_seconds()
        state, record = self.cycle(state, t)
        record['compile_seconds'] = metrics_lib.compile_seconds() - compiling
        records.append(record)
        lineage = {'method': self.name, 'seed': self.seed, 'cycle': t,
                   'parent_cycle': t - 1 if t else 'base', **self.s.lineage,
                   'grown': record['grown'], 'reset': record['reset'],
                   'sleep_metrics': record['sleep']}
        ckpt.save(t, state, metadata={'lineage': lineage, 'records': records},
                  force=True)
        ckpt.wait()
        note = on_cycle(record) if on_cycle else None
        self.log(self._cycle_line(record) + (f' | {note}' if note else ''))
    finally:
      ckpt.close()
    return records

  def _cycle_line(self, record: dict) -> str:
    """The cycle in one line, recall in percent, cycles counted from 1."""
    pct = lambda x: f'{100 * x:.0f}'
    stages = ', '.join(f'{stage} {pct(v["session"])}/{pct(v["base"])}'
                       for stage, v in record['stages'].items())
    return (f'[{self.name} seed {self.seed}] cycle {record["cycle"] + 1}/'
            f'{len(self.s.sessions)}: recall % sessions '
            f'[{" ".join(pct(a) for a in record["acc"])}] base '
            f'{pct(record["base_acc"])}'
            + (f' (session/base after {stages})' if stages else '')
            + f'; {record["seconds"]:.0f} s')

  def _restore(self, ckpt: Checkpointer, initial: dict):
    # This process's own CPU device: on a pod each process reads the whole
    # (small, host-side) state; jax.devices()[0] belongs to process 0.
    host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend='cpu')[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                       sharding=host),
        initial)
    def check(step, state, metadata):
      del state
      if len(metadata['records']) != step + 1:
        raise ValueError(f'{len(metadata["records"])} cycle records, '
                         f'expected {step + 1}')
      written_by = metadata.get('lineage', {}).get('run_hash')
      if written_by != self.s.lineage.get('run_hash'):
        raise ValueError(f'written by another config or world (run_hash '
                         f'{written_by}, this run '
                         f'{self.s.lineage.get("run_hash")})')

    tag = f'[{self.name} seed {self.seed}]'
    newest = ckpt.restore_newest(abstract, check=check,
                                 log=lambda line: self.log(f'{tag} {line}'))
    if newest is not None:
      step, state, metadata = newest
      self.log(f'{tag} resuming after cycle {step + 1} from '
               f'{os.path.join(ckpt.directory, str(step))}')
      return jax.device_get(state), list(metadata['records'])
    return initial, []

