"""The wake/sleep lifecycle over a stream of sessions.

docs/design.md §1 and §10.1.

One `Lifecycle` runs one method with one seed through every session:

* wake: the session's passages arrive. CMS methods grow a fast-level expert
  and learn them online (sleep_jax.wake); the fine-tuning baselines train on
  the same rows for the same number of steps (sleep_jax.baselines);
* sleep: Knowledge Seeding of the fast level into a new slow-level expert
  (sleep_jax.seeding), then dreaming on the session's passages, rehearsed
  into that expert (sleep_jax.dreaming) — or whatever the method does
  instead (`METHODS`);
* after every cycle: closed-book recall on every session so far, and on the
  base population.

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
import functools
import os
import time
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax import baselines
from sleep_jax import dreaming
from sleep_jax import eval as eval_lib
from sleep_jax import growth
from sleep_jax import metrics as metrics_lib
from sleep_jax import seeding
from sleep_jax import training
from sleep_jax import wake
from sleep_jax.checkpoints.manager import Checkpointer
from sleep_jax.models import cms
from sleep_jax.models import lora
from sleep_jax.models.config import dataclass_from_dict


@dataclasses.dataclass(frozen=True)
class Method:
  """What a method does in wake and in sleep.

  wake: 'cms' (a new fast-level expert learns the session online),
    'finetune' (every parameter), 'lora' (one adapter, kept across
    sessions) or 'none' (the passages are only read, in context).
  consolidate: Knowledge Seeding into the slow level, with `seeding` as
    overrides of the `sleep.*` config.
  dream: dreaming after consolidation (or alone), rehearsed into the slow
    level's expert unlocked this sleep (a new one is grown if needed).
  reset_fast: clear the fast level each night without consolidating.
  replay / ewc: fine-tuning with a replay buffer of earlier sessions' rows /
    with the EWC penalty.
  replay_base: the replay buffer also holds the base population's rows (an
    oracle: no other method may store them).
  anchor: hold the model before this session in place. Sleep: Knowledge
    Seeding's anchor term (`sleep.anchor_weight`) and dreaming's rehearsal
    anchor both point at the pre-wake model; fine-tuning: the same
    self-distillation term on the pre-session model's BOS samples
    (LwF-style, `baselines.anchor_weight`).
  compute_matched: fine-tuning for as many training rows as a Sleep cycle
    processes (`Settings.compute_steps` steps instead of `wake_steps`).
  """
  wake: str
  consolidate: bool = False
  dream: bool = False
  seeding: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  reset_fast: bool = False
  replay: bool = False
  ewc: bool = False
  replay_base: bool = False
  anchor: bool = False
  compute_matched: bool = False


_NO_ANCHOR = {'anchor_weight': 0.0}

METHODS = {
    'sleep': Method('cms', consolidate=True, dream=True, anchor=True),
    'sleep_no_anchor': Method('cms', consolidate=True, dream=True,
                              seeding=_NO_ANCHOR),
    'sleep_no_expansion': Method('cms', consolidate=True, dream=True,
                                 anchor=True, seeding={'expansion': False}),
    'sleep_no_lti': Method('cms', consolidate=True, dream=True, anchor=True,
                           seeding={'alpha': 1.0}),
    'sleep_no_dreaming': Method('cms', consolidate=True, anchor=True),
    'no_consolidation': Method('cms', reset_fast=True),
    'finetune': Method('finetune'),
    'finetune_anchor': Method('finetune', anchor=True),
    'finetune_compute': Method('finetune', compute_matched=True),
    'lora_finetune': Method('lora'),
    'replay': Method('finetune', replay=True),
    'replay_all': Method('finetune', replay=True, replay_base=True),
    'ewc': Method('finetune', ewc=True),
    'seal': Method('none', dream=True),
}


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
  """The baselines' knobs (config keys `baselines.<field>`); their learning
  rates are the validation-world sweep's choice (experiments/configs/
  continual.py, experiments/results/continual.md).
  `<method>_learning_rate` is the rate of each fine-tuning method;
  anchor_*: `finetune_anchor`'s self-distillation term (weight, BOS samples
  per step and their length)."""
  finetune_learning_rate: float = 3e-5
  finetune_anchor_learning_rate: float = 3e-4
  finetune_compute_learning_rate: float = 1e-5
  lora_learning_rate: float = 3e-5
  replay_learning_rate: float = 1e-4
  replay_all_learning_rate: float = 1e-3
  ewc_learning_rate: float = 3e-5
  anchor_weight: float = 10.0
  anchor_batch_size: int = 8
  anchor_max_new_tokens: int = 16
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: tuple = lora.ALL_KERNELS
  replay_fraction: float = 0.5
  ewc_weight: float = 100.0
  fisher_rows: int = 64

  def __post_init__(self):
    for name in ('finetune_learning_rate', 'finetune_anchor_learning_rate',
                 'finetune_compute_learning_rate', 'lora_learning_rate',
                 'replay_learning_rate', 'replay_all_learning_rate',
                 'ewc_learning_rate', 'lora_alpha'):
      if not getattr(self, name) > 0:
        raise ValueError(f'baselines.{name}={getattr(self, name)} must be > 0.')
    if not 0 < self.replay_fraction < 1:
      raise ValueError(f'baselines.replay_fraction={self.replay_fraction} '
                       'must be in (0, 1).')
    if self.anchor_weight < 0:
      raise ValueError(f'baselines.anchor_weight={self.anchor_weight} must '
                       'be >= 0 (0 = no anchor term).')
    for name in ('anchor_batch_size', 'anchor_max_new_tokens'):
      if getattr(self, name) < 1:
        raise ValueError(f'baselines.{name}={getattr(self, name)} must be '
                         '>= 1.')
    if self.ewc_weight < 0 or self.fisher_rows < 1:
      raise ValueError('baselines.ewc_weight must be >= 0 and '
                       'baselines.fisher_rows >= 1; got '
                       f'{self.ewc_weight}, {self.fisher_rows}.')
    self.lora  # validates rank / targets

  @property
  def lora(self) -> lora.LoraConfig:
    return lora.LoraConfig(self.lora_rank, self.lora_alpha,
                           lora.hashable_targets(self.lora_targets))

  @classmethod
  def from_dict(cls, values, key: str = 'baselines'):
    values = dict(values)
    if 'lora_targets' in values:
      values['lora_targets'] = lora.hashable_targets(values['lora_targets'])
    return dataclass_from_dict(cls, values, key)


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
  seeding: seeding.SeedingConfig
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
  # samples during wake) for the CMS methods with `Method.anchor`; 0 = off.
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


def active_param_count(params, model_state, adapter=None) -> int:
  """Parameters that take part in the forward pass: masked-off expert slots
  do not count; an adapter does."""
  total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  masks = model_state.get(cms.CMS_COLLECTION, {})
  for level in range(len(masks)):
    inactive_E = ~np.asarray(masks[cms.level_name(level)])
    mask = growth.expert_mask(params, level, inactive_E)
    total -= sum(int(np.sum(np.broadcast_to(m, np.shape(x))))
                 for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(params))
                 if m is not False)
  return total + (lora.num_params(adapter) if adapter is not None else 0)


def _prompt_rows(sessions) -> dict:
  """Sessions' wake rows as sleep prompt rows: {'tokens', 'lengths'}."""
  tokens = np.concatenate([s.rows['inputs'] for s in sessions])
  masks = np.concatenate([s.rows['mask'] for s in sessions])
  return {'tokens': tokens, 'lengths': masks.sum(1).astype(np.int32)}


@functools.lru_cache(maxsize=None)
def _wake_step(model, mesh, rules, batch_size: int, seq_len: int,
               anchored: bool = False):
  example = jnp.zeros((batch_size, seq_len), jnp.int32)
  shardings = wake.wake_state_shardings(model, mesh, rules, example)
  return wake.compile_wake_step(model, shardings, mesh, rules,
                                anchored), shardings


class Lifecycle:
  """One method, one seed, every session; see the module docstring."""

  def __init__(self, name: str, seed: int, settings: Settings, directory: str,
               log: Callable[[str], None] = print):
    if name not in METHODS:
      raise ValueError(f'Unknown method {name!r}; valid: {list(METHODS)}.')
    self.name, self.method, self.seed, self.s = name, METHODS[name], seed, settings
    overrides = dict(settings.method_seeding.get(name, {}))
    clash = sorted(set(overrides) & set(self.method.seeding))
    if clash:
      raise ValueError(f'sleep_per_method.{name} sets {clash}, which the '
                       f'method itself fixes ({dict(self.method.seeding)}); '
                       'drop them.')
    self.seeding = dataclasses.replace(
        settings.seeding, **{**self.method.seeding, **overrides})
    if self.method.replay_base and settings.base_replay is None:
      raise ValueError(f'{name} replays the base population: pass '
                       'Settings.base_replay (its rows).')
    if self.method.compute_matched and settings.compute_steps < 1:
      raise ValueError(f'{name} needs Settings.compute_steps >= 1 (got '
                       f'{settings.compute_steps}).')
    self.directory = directory
    self.log = log

  # ------------------------------------------------------------- state ---

  def initial_state(self, params, model_state) -> dict:
    """The pytree saved every cycle; its structure never changes."""
    key = jax.random.key(self.seed)
    extra = {}
    if self.method.wake == 'lora':
      extra['adapter'] = lora.init(params, self.s.baselines.lora,
                                   jax.random.fold_in(key, 1))
    if self.method.ewc:
      extra['fisher'] = jax.tree.map(jnp.zeros_like, params)
      extra['anchor'] = params
    if self.method.dream:
      extra['generator'] = lora.init(params, self.s.dreaming.lora,
                                     jax.random.fold_in(key, 2))
    return jax.device_get({'params': params, 'model_state': model_state,
                           'extra': extra})

  def eval_params(self, state):
    if self.method.wake == 'lora':
      return lora.merge(state['params'], state['extra']['adapter'],
                        self.s.baselines.lora)
    return state['params']

  # ------------------------------------------------------------- cycle ---

  def cycle(self, state: dict, t: int) -> tuple[dict, dict]:
    """Wake then sleep on session t; returns (state, the cycle's record)."""
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.key(self.seed), 1000 + t)
    # Keyed by the kind of wake, not the method: methods that wake alike
    # (Sleep and its ablations; fine-tuning with and without an anchor) see
    # the same batches, so their comparison is paired.
    host = np.random.default_rng([self.seed, t,
                                  zlib.crc32(self.method.wake.encode())])
    session = self.s.sessions[t]
    params, model_state = state['params'], state['model_state']
    pre_wake = (params, model_state)
    extra = dict(state['extra'])
    record = {'cycle': t, 'grown': [], 'reset': [], 'sleep': {}}
    m = self.method
    if m.wake == 'cms':
      params, model_state, losses = self._wake_cms(
          params, model_state, session.rows, jax.random.fold_in(key, 0), host,
          jax.random.fold_in(key, 5))
      self._check_losses('wake', losses)
    elif m.wake in ('finetune', 'lora'):
      old = [s.rows for s in self.s.sessions[:t]] if m.replay else []
      if m.replay_base:
        old.append(self.s.base_replay)
      old = ({k: np.concatenate([rows[k] for rows in old])
              for k in session.rows} if old else None)
      steps = self.s.compute_steps if m.compute_matched else self.s.wake_steps
      batches = baselines.draw_batches(
          session.rows, steps, self.s.batch_size, host, old,
          self.s.baselines.replay_fraction if old else 0.0)
      if m.wake == 'lora':
        extra['adapter'], losses = baselines.lora_finetune(
            self.s.model, self.s.baselines.lora, params, model_state,
            extra['adapter'], batches,
            learning_rate=self.s.baselines.lora_learning_rate)
      else:
        extras = ({'anchor': extra['anchor'], 'fisher': extra['fisher'],
                   'ewc_weight': self.s.baselines.ewc_weight} if m.ewc else {})
        if m.anchor and self.s.baselines.anchor_weight > 0:
          extras['self_anchor'] = self._self_anchor(
              params, model_state, steps, jax.random.fold_in(key, 4))
        params, losses = baselines.finetune(
            self.s.model, params, model_state, batches, learning_rate=getattr(
                self.s.baselines, f'{self.name}_learning_rate'), **extras)
      self._check_losses('wake', losses)
      record['sleep']['wake_loss'] = float(losses[-1])
      if m.ewc:
        rows = {k: v[:self.s.baselines.fisher_rows]
                for k, v in session.rows.items()}
        fisher = baselines.fisher_diagonal(self.s.model, params, model_state,
                                           rows)
        extra['fisher'] = jax.tree.map(jnp.add, extra['fisher'], fisher)
        extra['anchor'] = params
    params, model_state = jax.device_get((params, model_state))
    stages = record['stages'] = {}
    probe_items = {k: np.reshape(v, (-1, v.shape[-1]))
                   for k, v in session.tasks.items.items()}

    def probe():
      """Recall now: the session's and the base population's held-out items,
      and the session's probe items (forms its passages used)."""
      evaluated = self.eval_params({'params': params, 'extra': extra})
      recall = lambda items: eval_lib.recall_accuracy(
          self.s.model, evaluated, model_state, items)
      return {'session': recall(session.items),
              'base': recall(self.s.base_items),
              'session_probe': recall(probe_items)}

    if m.wake != 'none':
      stages['wake'] = probe()

    slots = []
    if m.reset_fast:
      record['reset'] = growth.active_slots(model_state, self.s.fast_level)
      params, model_state = growth.reset(params, model_state, self.s.fast_level,
                                         record['reset'])
    if m.consolidate:
      anchor_replay = None
      if self.seeding.anchor_weight > 0 and t > 0 and (
          self.seeding.anchor_prompts == 'replay'):
        anchor_replay = _prompt_rows(self.s.sessions[:t])
      with self._diverging('consolidation'):
        out = seeding.consolidate(
            self.s.model, params, model_state, level=self.s.slow_level,
            replay=_prompt_rows([session]), anchor_replay=anchor_replay,
            cfg=self.seeding, rng=jax.random.fold_in(key, 1),
            judge=self.s.judge, decode=self.s.decode, mesh=self.s.mesh,
            rules=self.s.rules, **self.s.token_ids)
      params, model_state = jax.device_get((out.params, out.model_state))
      record['reset'] = [int(s) for s in out.reset_slots]
      if out.grown_slots:
        slots = record['grown'] = [int(x) for x in out.grown_slots]
      else:
        slots = growth.active_slots(model_state, self.s.slow_level)
      record['sleep'].update({f'ks_{k}': float(v) for k, v in
                              out.metrics[-1].items() if np.isscalar(v)})
      stages['consolidation'] = probe()
    if m.dream:
      if not slots:
        params, model_state, slot = growth.grow(
            params, model_state, self.s.slow_level, jax.random.fold_in(key, 2))
        slots = record['grown'] = [int(slot)]
      with self._diverging('dreaming'):
        out = dreaming.dream(
            self.s.model, self.s.dreaming, params, model_state, session.tasks,
            jax.random.fold_in(key, 3), level=self.s.slow_level, slots=slots,
            generator=extra['generator'], seed=int(host.integers(2**31)),
            anchor=pre_wake if m.anchor else None, **self.s.token_ids)
      params, extra['generator'] = out.params, out.generator
      if out.rounds:
        record['sleep']['dream_reward_first'] = out.rounds[0]['reward_fraction']
        record['sleep']['dream_reward_last'] = out.rounds[-1]['reward_fraction']
        record['sleep']['dreams_accepted'] = len(out.accepted.get('tokens', []))
      params = jax.device_get(params)
      stages['dreaming'] = probe()
    state = jax.device_get({'params': params, 'model_state': model_state,
                            'extra': extra})
    evaluated = self.eval_params(state)
    record['acc'] = [eval_lib.recall_accuracy(self.s.model, evaluated,
                                              model_state, s.items)
                     for s in self.s.sessions[:t + 1]]
    record['base_acc'] = eval_lib.recall_accuracy(
        self.s.model, evaluated, model_state, self.s.base_items)
    record['params'] = active_param_count(params, model_state,
                                          extra.get('adapter'))
    record['seconds'] = time.perf_counter() - t0
    return state, record

  def _learning_rate(self, stage: str) -> tuple[str, float]:
    """(config key, value) of the rate this method trains with in `stage`:
    what a user lowers when that stage diverges."""
    if stage == 'wake' and self.method.wake == 'cms':
      level = self.s.model.config.cms_levels[self.s.fast_level]
      return (f'model.cms_levels[{self.s.fast_level}].learning_rate',
              level.learning_rate)
    if stage == 'wake':
      field = ('lora_learning_rate' if self.method.wake == 'lora'
               else f'{self.name}_learning_rate')
      return f'baselines.{field}', getattr(self.s.baselines, field)
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

  def _check_losses(self, stage: str, losses) -> None:
    why = training.divergence(losses, self.s.model.config.vocab_size,
                              self.s.divergence_steps)
    if why:
      raise self._diverged(stage, why)

  @contextlib.contextmanager
  def _diverging(self, stage: str):
    """Names this method's rate in a NaN/inf a stage's own check raises."""
    try:
      yield
    except FloatingPointError as e:
      if isinstance(e, training.DivergenceError):
        raise
      raise self._diverged(stage, str(e).split('.')[0]) from e

  def _self_anchor(self, params, model_state, steps: int, key) -> dict:
    """finetune_anchor's term: the model before this session, frozen, and
    `steps` batches of its own BOS samples."""
    cfg = self.s.baselines
    rows = baselines.self_samples(
        self.s.model, params, model_state, steps=steps,
        batch_size=cfg.anchor_batch_size,
        max_new_tokens=cfg.anchor_max_new_tokens, rng=key,
        **self.s.token_ids)
    return {'params': params, 'model_state': model_state,
            'weight': cfg.anchor_weight, 'rows': rows}

  def _wake_cms(self, params, model_state, rows, key, host, anchor_key):
    pre_wake = (params, model_state)
    params, model_state, _ = growth.grow(params, model_state,
                                         self.s.fast_level, key)
    anchored = self.method.anchor and self.s.wake_anchor_weight > 0
    step, shardings = _wake_step(self.s.model, self.s.mesh, self.s.rules,
                                 self.s.batch_size, rows['inputs'].shape[1],
                                 anchored)
    state = jax.device_put(
        wake.init_wake_state(self.s.model.config, params, model_state),
        shardings)
    batches = baselines.draw_batches(rows, self.s.wake_steps,
                                     self.s.batch_size, host)
    anchor = None
    if anchored:
      # Its own key and drawn after the batches, so the data batches stay
      # those of the unanchored wake.
      samples = baselines.self_samples(
          self.s.model, *pre_wake, steps=self.s.wake_steps,
          batch_size=self.seeding.anchor_batch_size,
          max_new_tokens=self.seeding.anchor_max_new_tokens,
          rng=anchor_key, **self.s.token_ids)
      batches = {**batches, 'anchor_tokens': samples['tokens'],
                 'anchor_mask': samples['mask']}
      # A copy: the wake state is donated and may share its buffers.
      frozen = jax.device_put(pre_wake, (shardings.params,
                                         shardings.model_state),
                              may_alias=False)
      anchor = {'params': frozen[0], 'model_state': frozen[1],
                'weight': self.s.wake_anchor_weight}
    losses = []
    for i in range(self.s.wake_steps):
      state, metrics = step(state, {k: v[i] for k, v in batches.items()},
                            i == self.s.wake_steps - 1, anchor)
      losses.append(metrics['loss'])
    # One transfer after the loop: no host round trip per step.
    return state.params, state.model_state, np.asarray(jnp.stack(losses))

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
    host = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
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

