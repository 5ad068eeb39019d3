"""The lifecycle's methods, registered by name (docs/design.md §10.1).

A method is a small object whose hooks `sleep_jax.lifecycle` calls once per
cycle, in the same order for every method:

    extra = method.init_extra(params, key, settings)   # once: its own state
    method.wake(cycle)     # the session arrives
    method.sleep(cycle)    # between sessions
    recall on method.evaluated(params, extra, settings)

`Cycle` is what the hooks read and update: the model, the method's own state
(`extra`, saved with the model every cycle), the cycle's keys and record, and
`probe(stage)`, recall after a stage. The Sleep family composes the sleep
steps `consolidate` and `dream`; the fine-tuning family differs in which
rows it trains on and which terms it adds.

A new method is one class (or one instance of an existing class) passed to
`register`; nothing else changes. Its name is the key in `METHODS`, in the
config's `methods` and in results.json.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax import baselines
from sleep_jax import dreaming
from sleep_jax import growth
from sleep_jax import seeding
from sleep_jax import sharding as sharding_lib
from sleep_jax import wake as wake_lib
from sleep_jax.models import lora


@dataclasses.dataclass
class Cycle:
  """One cycle of one lifecycle in progress.

  lifecycle: the `Lifecycle` (settings `.s`, seed, the method's seeding
    config `.seeding`, loss checks); t: the session's index; key / host:
    this cycle's JAX key and host generator; params, model_state, extra: the
    model and the method's own state, updated by the hooks; pre_wake: the
    model before this session; record: what the cycle reports (`grown`,
    `reset`, `sleep` metrics, `stages`).
  """
  lifecycle: Any
  t: int
  key: jax.Array
  host: np.random.Generator
  params: Any
  model_state: Any
  extra: dict
  record: dict
  probe: Callable[[], dict]

  def __post_init__(self):
    self.pre_wake = (self.params, self.model_state)

  @property
  def s(self):
    return self.lifecycle.s

  @property
  def session(self):
    return self.s.sessions[self.t]

  def subkey(self, n: int) -> jax.Array:
    return jax.random.fold_in(self.key, n)

  def to_host(self) -> None:
    self.params, self.model_state = jax.device_get(
        (self.params, self.model_state))

  def stage_done(self, stage: str) -> None:
    """Brings the model to the host and records recall after `stage`."""
    self.to_host()
    self.record['stages'][stage] = self.probe()


@dataclasses.dataclass(frozen=True)
class Method:
  """The hooks' defaults: no state, no wake, no sleep.

  name: the method's key. wake_kind: methods that wake alike share it, and
  it keys the host randomness of a cycle, so they see the same batches and
  their comparison is paired. seeding: `sleep.*` overrides the method itself
  fixes. consolidates / dreams / anchored: what its sleep does, read by
  config checks (which `sleep_per_method` keys apply, how many experts a
  sleep grows, whether the wake must leave dense MLPs alone).
  """
  name: str
  wake_kind: str = 'none'
  seeding: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  consolidates: bool = False
  dreams: bool = False
  anchored: bool = False

  def check(self, settings) -> None:
    """Raises ValueError if `settings` lack what this method needs."""

  def init_extra(self, params, key, settings) -> dict:
    del params, key, settings
    return {}

  def evaluated(self, params, extra, settings):
    """The params recall is measured on."""
    del extra, settings
    return params

  def extra_param_count(self, extra) -> int:
    """Parameters of its own state that take part in the forward pass."""
    del extra
    return 0

  def wake_learning_rate(self, settings) -> tuple[str, float]:
    """(config key, value) of the rate its wake trains with: what a user
    lowers when wake diverges."""
    raise NotImplementedError(f'{self.name} does not train in wake.')

  def wake(self, c: Cycle) -> None:
    del c

  def sleep(self, c: Cycle) -> None:
    del c

  def grown_per_sleep(self, knobs: Mapping[str, Any]) -> int:
    """Slow-level experts one sleep unlocks, given its seeding knobs."""
    if self.consolidates and knobs['expansion']:
      return int(knobs['experts'])
    return 1 if self.dreams else 0  # dreaming alone grows one to rehearse into


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds `method` to `METHODS` under its name (which must be new)."""
  if method.name in METHODS:
    raise ValueError(f'A method named {method.name!r} is registered already.')
  METHODS[method.name] = method
  return method


# ----------------------------------------------------------- sleep steps ---


def _prompt_rows(sessions) -> dict:
  """Sessions' wake rows as sleep prompt rows: {'tokens', 'lengths'}."""
  tokens = np.concatenate([s.rows['inputs'] for s in sessions])
  masks = np.concatenate([s.rows['mask'] for s in sessions])
  return {'tokens': tokens, 'lengths': masks.sum(1).astype(np.int32)}


def consolidate(c: Cycle) -> list[int]:
  """Knowledge Seeding of the fast level into the slow one; returns the
  slow-level slots it trained (grown, or all active without expansion)."""
  lc, s = c.lifecycle, c.s
  anchor_replay = None
  if lc.seeding.anchor_weight > 0 and c.t > 0 and (
      lc.seeding.anchor_prompts == 'replay'):
    anchor_replay = _prompt_rows(s.sessions[:c.t])
  with lc.diverging('consolidation'):
    out = seeding.consolidate(
        s.model, c.params, c.model_state, level=s.slow_level,
        replay=_prompt_rows([c.session]), anchor_replay=anchor_replay,
        cfg=lc.seeding, rng=c.subkey(1), judge=s.judge, decode=s.decode,
        mesh=s.mesh, rules=s.rules, **s.token_ids)
  c.params, c.model_state = out.params, out.model_state
  c.record['reset'] = [int(x) for x in out.reset_slots]
  c.record['sleep'].update({f'ks_{k}': float(v) for k, v in
                            out.metrics[-1].items() if np.isscalar(v)})
  c.stage_done('consolidation')
  if out.grown_slots:
    slots = c.record['grown'] = [int(x) for x in out.grown_slots]
    return slots
  return growth.active_slots(c.model_state, s.slow_level)


def dream(c: Cycle, slots: list[int], anchored: bool) -> None:
  """Dreaming on the session's passages, rehearsed into `slots` of the slow
  level (one is grown if there are none); with `anchored`, rehearsal holds
  the pre-wake model in place."""
  lc, s = c.lifecycle, c.s
  if not slots:
    c.params, c.model_state, slot = growth.grow(
        c.params, c.model_state, s.slow_level, c.subkey(2))
    slots = c.record['grown'] = [int(slot)]
  with lc.diverging('dreaming'):
    out = dreaming.dream(
        s.model, s.dreaming, c.params, c.model_state, c.session.tasks,
        c.subkey(3), level=s.slow_level, slots=slots,
        generator=c.extra['generator'], seed=int(c.host.integers(2**31)),
        anchor=c.pre_wake if anchored else None, **s.token_ids)
  c.params, c.extra['generator'] = out.params, out.generator
  if out.rounds:
    c.record['sleep']['dream_reward_first'] = out.rounds[0]['reward_fraction']
    c.record['sleep']['dream_reward_last'] = out.rounds[-1]['reward_fraction']
    c.record['sleep']['dreams_accepted'] = len(out.accepted.get('tokens', []))
  c.stage_done('dreaming')


def _dream_generator(params, key, settings) -> dict:
  return {'generator': lora.init(params, settings.dreaming.lora,
                                 jax.random.fold_in(key, 2))}


# ------------------------------------------------------------ CMS wake ---


@functools.lru_cache(maxsize=None)
def _wake_step(model, mesh, rules, batch_size: int, seq_len: int,
               anchored: bool = False):
  example = jnp.zeros((batch_size, seq_len), jnp.int32)
  shardings = wake_lib.wake_state_shardings(model, mesh, rules, example)
  return wake_lib.compile_wake_step(model, shardings, mesh, rules,
                                    anchored), shardings


def wake_cms(c: Cycle, anchored: bool) -> None:
  """A new fast-level expert learns the session online (sleep_jax.wake);
  with `anchored` (and `wake.anchor_weight` > 0), a JSD term to the
  pre-wake model on its own BOS samples holds the rest in place."""
  lc, s = c.lifecycle, c.s
  rows = c.session.rows
  params, model_state, _ = growth.grow(c.params, c.model_state, s.fast_level,
                                       c.subkey(0))
  anchored = anchored and s.wake_anchor_weight > 0
  step, shardings = _wake_step(s.model, s.mesh, s.rules, s.batch_size,
                               rows['inputs'].shape[1], anchored)
  state = sharding_lib.put(
      wake_lib.init_wake_state(s.model.config, params, model_state),
      shardings)
  batches = baselines.draw_batches(rows, s.wake_steps, s.batch_size, c.host)
  anchor = None
  if anchored:
    # Its own key and drawn after the batches, so the data batches stay
    # those of the unanchored wake.
    samples = baselines.self_samples(
        s.model, *c.pre_wake, steps=s.wake_steps,
        batch_size=lc.seeding.anchor_batch_size,
        max_new_tokens=lc.seeding.anchor_max_new_tokens,
        rng=c.subkey(5), **s.token_ids)
    batches = {**batches, 'anchor_tokens': samples['tokens'],
               'anchor_mask': samples['mask']}
    # A copy: the wake state is donated and may share its buffers.
    frozen = sharding_lib.put(c.pre_wake, (shardings.params,
                                         shardings.model_state),
                            may_alias=False)
    anchor = {'params': frozen[0], 'model_state': frozen[1],
              'weight': s.wake_anchor_weight}
  losses = []
  for i in range(s.wake_steps):
    state, metrics = step(state, {k: v[i] for k, v in batches.items()},
                          i == s.wake_steps - 1, anchor)
    losses.append(metrics['loss'])
  # One transfer after the loop: no host round trip per step.
  lc.check_losses('wake', np.asarray(jnp.stack(losses)))
  c.params, c.model_state = state.params, state.model_state
  c.stage_done('wake')


@dataclasses.dataclass(frozen=True)
class Sleep(Method):
  """Sleep and its ablations: CMS wake, then Knowledge Seeding into the slow
  level (`consolidates`) and dreaming rehearsed into its new expert
  (`dreams`). `anchored`: Knowledge Seeding's anchor term, the wake anchor
  and dreaming's rehearsal anchor all point at the pre-wake model."""
  wake_kind: str = 'cms'
  consolidates: bool = True
  dreams: bool = True
  anchored: bool = True

  def init_extra(self, params, key, settings) -> dict:
    return _dream_generator(params, key, settings) if self.dreams else {}

  def wake_learning_rate(self, settings) -> tuple[str, float]:
    level = settings.model.config.cms_levels[settings.fast_level]
    return (f'model.cms_levels[{settings.fast_level}].learning_rate',
            level.learning_rate)

  def wake(self, c: Cycle) -> None:
    wake_cms(c, self.anchored)

  def sleep(self, c: Cycle) -> None:
    slots = consolidate(c) if self.consolidates else []
    if self.dreams:
      dream(c, slots, self.anchored)


@dataclasses.dataclass(frozen=True)
class NoConsolidation(Sleep):
  """CMS wake; each night the fast level is cleared, nothing is kept."""
  consolidates: bool = False
  dreams: bool = False
  anchored: bool = False

  def sleep(self, c: Cycle) -> None:
    level = c.s.fast_level
    c.record['reset'] = growth.active_slots(c.model_state, level)
    c.params, c.model_state = growth.reset(c.params, c.model_state, level,
                                           c.record['reset'])


@dataclasses.dataclass(frozen=True)
class Seal(Method):
  """SEAL-style: the passages are only read in context; sleep is dreaming
  alone, rehearsed into a newly grown slow-level expert."""
  dreams: bool = True

  def init_extra(self, params, key, settings) -> dict:
    return _dream_generator(params, key, settings)

  def sleep(self, c: Cycle) -> None:
    dream(c, [], anchored=False)


# ---------------------------------------------------- fine-tuning family ---


@dataclasses.dataclass(frozen=True)
class Finetune(Method):
  """Every parameter, Adam, on the session's rows for the wake's number of
  steps, at `baselines.<name>_learning_rate`; no sleep."""
  wake_kind: str = 'finetune'

  def wake_learning_rate(self, settings) -> tuple[str, float]:
    field = f'{self.name}_learning_rate'
    return f'baselines.{field}', getattr(settings.baselines, field)

  def steps(self, settings) -> int:
    return settings.wake_steps

  def old_rows(self, c: Cycle) -> list[dict]:
    """Rows of earlier sessions mixed into each batch (replay)."""
    del c
    return []

  def batches(self, c: Cycle) -> dict:
    old = self.old_rows(c)
    old = ({k: np.concatenate([rows[k] for rows in old])
            for k in c.session.rows} if old else None)
    return baselines.draw_batches(
        c.session.rows, self.steps(c.s), c.s.batch_size, c.host, old,
        c.s.baselines.replay_fraction if old else 0.0)

  def terms(self, c: Cycle) -> dict:
    """Extra terms of the loss, as keyword arguments of
    `baselines.finetune`."""
    del c
    return {}

  def train(self, c: Cycle, batches: dict):
    params, losses = baselines.finetune(
        c.s.model, c.params, c.model_state, batches,
        learning_rate=self.wake_learning_rate(c.s)[1], **self.terms(c))
    c.params = params
    return losses

  def after_wake(self, c: Cycle) -> None:
    del c

  def wake(self, c: Cycle) -> None:
    losses = self.train(c, self.batches(c))
    c.lifecycle.check_losses('wake', losses)
    c.record['sleep']['wake_loss'] = float(losses[-1])
    self.after_wake(c)
    c.stage_done('wake')


@dataclasses.dataclass(frozen=True)
class FinetuneAnchor(Finetune):
  """Fine-tuning with a self-distillation anchor (LwF-style): weight *
  JSD(pre-session model || model) on the pre-session model's own BOS
  samples (`baselines.anchor_*`)."""
  anchored: bool = True

  def terms(self, c: Cycle) -> dict:
    cfg = c.s.baselines
    if not cfg.anchor_weight > 0:
      return {}
    rows = baselines.self_samples(
        c.s.model, c.params, c.model_state, steps=self.steps(c.s),
        batch_size=cfg.anchor_batch_size,
        max_new_tokens=cfg.anchor_max_new_tokens, rng=c.subkey(4),
        **c.s.token_ids)
    return {'self_anchor': {'params': c.params, 'model_state': c.model_state,
                            'weight': cfg.anchor_weight, 'rows': rows}}


@dataclasses.dataclass(frozen=True)
class FinetuneCompute(Finetune):
  """Fine-tuning for as many training rows as a Sleep cycle processes
  (`Settings.compute_steps` steps per session)."""

  def check(self, settings) -> None:
    if settings.compute_steps < 1:
      raise ValueError(f'{self.name} needs Settings.compute_steps >= 1 (got '
                       f'{settings.compute_steps}).')

  def steps(self, settings) -> int:
    return settings.compute_steps


@dataclasses.dataclass(frozen=True)
class Replay(Finetune):
  """Fine-tuning with a replay buffer of every earlier session's rows
  (`baselines.replay_fraction` of each batch); `with_base` adds the base
  population's rows (an oracle: no other method may store them)."""
  with_base: bool = False

  def check(self, settings) -> None:
    if self.with_base and settings.base_replay is None:
      raise ValueError(f'{self.name} replays the base population: pass '
                       'Settings.base_replay (its rows).')

  def old_rows(self, c: Cycle) -> list[dict]:
    old = [s.rows for s in c.s.sessions[:c.t]]
    return old + [c.s.base_replay] if self.with_base else old


@dataclasses.dataclass(frozen=True)
class Ewc(Finetune):
  """Online EWC: the penalty (lambda / 2) sum_i F_i (theta_i - theta*_i)^2,
  its Fisher summed over sessions and its anchor moved after each."""

  def init_extra(self, params, key, settings) -> dict:
    del key, settings
    return {'fisher': jax.tree.map(jnp.zeros_like, params), 'anchor': params}

  def terms(self, c: Cycle) -> dict:
    return {'anchor': c.extra['anchor'], 'fisher': c.extra['fisher'],
            'ewc_weight': c.s.baselines.ewc_weight}

  def after_wake(self, c: Cycle) -> None:
    rows = {k: v[:c.s.baselines.fisher_rows]
            for k, v in c.session.rows.items()}
    fisher = baselines.fisher_diagonal(c.s.model, c.params, c.model_state,
                                       rows)
    c.extra['fisher'] = jax.tree.map(jnp.add, c.extra['fisher'], fisher)
    c.extra['anchor'] = c.params


@dataclasses.dataclass(frozen=True)
class LoraFinetune(Finetune):
  """One LoRA adapter, kept and trained from session to session; recall is
  measured on the model with it merged."""
  wake_kind: str = 'lora'

  def init_extra(self, params, key, settings) -> dict:
    return {'adapter': lora.init(params, settings.baselines.lora,
                                 jax.random.fold_in(key, 1))}

  def evaluated(self, params, extra, settings):
    return lora.merge(params, extra['adapter'], settings.baselines.lora)

  def extra_param_count(self, extra) -> int:
    return lora.num_params(extra['adapter'])

  def wake_learning_rate(self, settings) -> tuple[str, float]:
    return 'baselines.lora_learning_rate', settings.baselines.lora_learning_rate

  def train(self, c: Cycle, batches: dict):
    c.extra['adapter'], losses = baselines.lora_finetune(
        c.s.model, c.s.baselines.lora, c.params, c.model_state,
        c.extra['adapter'], batches,
        learning_rate=c.s.baselines.lora_learning_rate)
    return losses


_NO_ANCHOR = {'anchor_weight': 0.0}

register(Sleep('sleep'))
register(Sleep('sleep_no_anchor', anchored=False, seeding=_NO_ANCHOR))
register(Sleep('sleep_no_expansion', seeding={'expansion': False}))
register(Sleep('sleep_no_lti', seeding={'alpha': 1.0}))
register(Sleep('sleep_no_dreaming', dreams=False))
register(NoConsolidation('no_consolidation'))
register(Finetune('finetune'))
register(FinetuneAnchor('finetune_anchor'))
register(FinetuneCompute('finetune_compute'))
register(LoraFinetune('lora_finetune'))
register(Replay('replay'))
register(Replay('replay_all', with_base=True))
register(Ewc('ewc'))
register(Seal('seal'))
