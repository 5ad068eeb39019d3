"""Knowledge Seeding: the consolidation stage of sleep (docs/design.md §4).

The knowledge a fast CMS level holds moves into a newly grown expert of the
next, slower level; then the fast level's experts are freed.

* Teacher = the model when sleep starts. Student = the same params with a
  new expert grown in level l* and the consolidatable experts of level l*-1
  (every active low-rank expert there: they were grown or trained since the
  last consolidation) reset. Only the new expert (A, B) and its router row
  train; everything else is bit-identical after any number of steps.
* Objective (minimised): alpha * F(T||S) on GKD completions
  + (1 - alpha) * policy-gradient loss of Learning to Imitate.
  GKD completions are teacher samples or, with probability `lmbda` per
  sample (or per batch), student samples; no gradient flows through
  sampling. LTI: the teacher's completions are its dreams; each is cut at a
  uniformly random length, the student samples G continuations of the cut,
  each is rewarded by gamma * r_sem + (1 - gamma) * r_abs against the
  teacher's continuation (sleep_jax.rewards), and the advantage is the
  reward minus its group's mean (GRPO without a KL term).
* Anchor (optional, `anchor_weight` > 0): + anchor_weight * F(A||S) on
  completions sampled by A, the pre-wake model. The new expert is always
  on, so it also fires on old inputs; the teacher is the post-wake model, so
  distilling from it alone copies whatever wake broke in old knowledge into
  the slow level. A costs nothing to build: it is the student at
  initialisation (fast experts reset, new expert B = 0), a frozen copy.
* One loop on the host per step: draw replay prompts, sample with the
  shared sampler (sleep_jax.sampling), score rewards (all three in
  `sleep_jax.seeding_rollouts`), then one jitted, sharded update
  (`compile_seeding_step`) that compiles once per (model, config, level)
  and row width and is reused across sleep cycles: the new slot is data
  (bool[E_max]), not a shape; so are the anchor's params. (With
  `anchor_prompts='replay'` the first session's BOS-only anchor rows are
  narrower than later ones: one more compile.)

Sequences: prompts and completions are joined by `sleep_jax.sequences`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sleep_jax import growth
from sleep_jax.divergences import (forward_kl, generalized_jsd,  # noqa: F401
                                   masked_mean, reverse_kl)
from sleep_jax import metrics as metrics_lib
from sleep_jax import rewards
from sleep_jax import seeding_rollouts
from sleep_jax import sharding as sharding_lib
from sleep_jax.models import cms
from sleep_jax.models import transformer
from sleep_jax.sequences import completion_logprobs
from sleep_jax.stage_config import dataclass_from_dict

DIVERGENCES = ('jsd', 'forward_kl', 'reverse_kl')
PROMPT_SOURCES = ('replay', 'bos', 'mixed')
LAMBDA_MODES = ('sample', 'batch')
ANCHOR_PROMPTS = ('bos', 'replay')


# ------------------------------------------------------------------ config ---


@dataclasses.dataclass(frozen=True)
class SeedingConfig:
  """Every Knowledge Seeding knob (config keys `sleep.<field>`).

  alpha: weight of distillation vs LTI (1 = pure on-policy distillation).
  lmbda: on-policy fraction of GKD completions (TRL's name), drawn per
    `lmbda_mode` ('sample' or 'batch').
  divergence: 'jsd' (with `beta`), 'forward_kl' or 'reverse_kl'.
  temperature: sampling temperature, also applied to the divergence.
  gamma: weight of the semantic reward r_sem vs the edit-distance r_abs.
  z0: largest token edit distance that still earns r_abs.
  group_size: G, student completions per LTI prefix (group baseline).
  normalize_advantages: divide advantages by the group's reward std.
  judge / judge_threshold: the semantic judge ('embedding', 'exact',
    'teacher'; sleep_jax.rewards) and its cosine threshold (None = default).
  num_steps, batch_size, learning_rate: the KS optimisation (Adam).
  max_new_tokens: length of teacher/student completions.
  prompt_source: 'replay' (prefixes of recent wake rows), 'bos'
    (unconditional) or 'mixed' (`bos_fraction` of rows from BOS).
  min_prompt_tokens: shortest replay prefix (BOS included).
  expansion: grow new experts (True) or train the level's existing
    params instead (the "w/o expansion" ablation).
  experts: how many new experts each sleep grows (with expansion); KS
    trains them together. A session that brings more knowledge can be
    given more (see `capacity.scaled` in the continual config).
  anchor_weight: weight of F(A||S), `divergence` from the pre-wake model A
    (the student at initialisation, frozen) on A's own samples; 0 = off,
    and then nothing of the anchor is sampled, stored or compiled.
  anchor_prompts: what A continues: 'bos' (unconditional) or 'replay'
    (prefixes of earlier sessions' rows, `consolidate(anchor_replay=)`;
    BOS when there are none, e.g. in the first session).
  anchor_batch_size / anchor_max_new_tokens: A's completions per KS step
    and their length (sampled at `temperature`).
  """

  alpha: float = 0.5
  lmbda: float = 0.5
  lmbda_mode: str = 'sample'
  divergence: str = 'jsd'
  beta: float = 0.5
  temperature: float = 1.0
  gamma: float = 0.5
  z0: float = 8.0
  group_size: int = 4
  normalize_advantages: bool = False
  judge: str = 'exact'
  judge_threshold: float | None = None
  num_steps: int = 100
  batch_size: int = 16
  learning_rate: float = 1e-2
  max_new_tokens: int = 16
  prompt_source: str = 'mixed'
  bos_fraction: float = 0.25
  min_prompt_tokens: int = 2
  expansion: bool = True
  experts: int = 1
  anchor_weight: float = 0.0
  anchor_prompts: str = 'bos'
  anchor_batch_size: int = 8
  anchor_max_new_tokens: int = 16

  def __post_init__(self):
    key = 'sleep'
    for name in ('alpha', 'lmbda', 'gamma', 'beta', 'bos_fraction'):
      value = getattr(self, name)
      if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f'{key}.{name}={value} must be in [0, 1].')
    choices = {'divergence': DIVERGENCES, 'prompt_source': PROMPT_SOURCES,
               'lmbda_mode': LAMBDA_MODES, 'judge': rewards.JUDGES,
               'anchor_prompts': ANCHOR_PROMPTS}
    for name, valid in choices.items():
      if getattr(self, name) not in valid:
        raise ValueError(f'{key}.{name}={getattr(self, name)!r}; valid: '
                         f'{list(valid)}.')
    if self.z0 < 0:
      raise ValueError(f'{key}.z0={self.z0} must be >= 0 (an edit-distance '
                       'threshold in tokens).')
    if self.alpha < 1 and self.group_size < 2:
      raise ValueError(f'{key}.group_size={self.group_size}: LTI needs >= 2 '
                       'completions per prefix for its group baseline (or set '
                       f'{key}.alpha=1 to turn LTI off).')
    if self.temperature <= 0:
      raise ValueError(f'{key}.temperature={self.temperature} must be > 0: '
                       'Knowledge Seeding samples on-policy.')
    if not float(self.anchor_weight) >= 0:
      raise ValueError(f'{key}.anchor_weight={self.anchor_weight} must be >= 0 '
                       '(0 turns the pre-wake anchor off).')
    for name in ('num_steps', 'batch_size', 'max_new_tokens',
                 'min_prompt_tokens', 'experts', 'anchor_batch_size',
                 'anchor_max_new_tokens'):
      if int(getattr(self, name)) < 1:
        raise ValueError(f'{key}.{name}={getattr(self, name)} must be >= 1.')
    if self.learning_rate <= 0:
      raise ValueError(f'{key}.learning_rate={self.learning_rate} must be > 0.')

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], key: str = 'sleep'):
    return dataclass_from_dict(cls, values, key)

  def divergence_fn(self) -> Callable[..., jax.Array]:
    if self.divergence == 'forward_kl':
      return functools.partial(forward_kl, temperature=self.temperature)
    if self.divergence == 'reverse_kl':
      return functools.partial(reverse_kl, temperature=self.temperature)
    return functools.partial(generalized_jsd, beta=self.beta,
                             temperature=self.temperature)


# -------------------------------------------------------------- the step ---


@flax.struct.dataclass
class SeedingState:
  """The student during Knowledge Seeding; opt_state covers level l* only."""

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any


def make_optimizer(cfg: SeedingConfig) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adam(cfg.learning_rate))


def seeding_loss(model: nn.Module, cfg: SeedingConfig, params, model_state,
                 teacher, batch: Mapping[str, jax.Array], anchor=None):
  """(alpha * F(T||S) + (1 - alpha) * L_PG [+ anchor_weight * F(A||S)],
  metrics). teacher / anchor = (params, state); anchor is used (and needed)
  only when cfg.anchor_weight > 0."""
  student = lambda tokens: model.apply(
      transformer.variables(params, model_state), tokens)
  frozen = lambda model_vars, tokens: jax.lax.stop_gradient(model.apply(
      transformer.variables(*model_vars), tokens))
  loss, metrics = 0.0, {}
  if cfg.alpha > 0:
    teacher_logits = frozen(teacher, batch['gkd_tokens'])
    divergence = cfg.divergence_fn()(student(batch['gkd_tokens']),
                                     teacher_logits, batch['gkd_mask'])
    loss += cfg.alpha * divergence
    metrics['divergence'] = divergence
  if cfg.alpha < 1:
    log_p = completion_logprobs(student(batch['lti_tokens']),
                                batch['lti_tokens'])
    weighted = batch['lti_advantages'][:, None] * log_p
    pg_loss = -masked_mean(weighted, batch['lti_mask'])
    loss += (1.0 - cfg.alpha) * pg_loss
    metrics['pg_loss'] = pg_loss
  if cfg.anchor_weight > 0:
    if anchor is None:
      raise ValueError(f'sleep.anchor_weight={cfg.anchor_weight} > 0 needs the '
                       'anchor model: pass anchor=(params, model_state).')
    tokens = batch['anchor_tokens']
    anchored = cfg.divergence_fn()(student(tokens), frozen(anchor, tokens),
                                   batch['anchor_mask'])
    loss += cfg.anchor_weight * anchored
    metrics['anchor_divergence'] = anchored
  metrics['loss'] = loss
  return loss, metrics


def trainable_mask(cfg: SeedingConfig, params, level: int, slots_E):
  """level_params-shaped mask: the slots (A, B, router) [+ dense w/o expansion]."""
  full = growth.expert_mask(params, level, slots_E, dense=not cfg.expansion)
  return cms.level_params(full, level)


def seeding_step(model: nn.Module, cfg: SeedingConfig, level: int,
                 state: SeedingState, batch, teacher, slots_E, anchor=None):
  """One Adam step on the trainable slots of `level`; the rest is untouched.

  anchor: (params, model_state) of the pre-wake model when
  cfg.anchor_weight > 0, else None.
  """
  tx = make_optimizer(cfg)
  tree = cms.level_params(state.params, level)
  mask = trainable_mask(cfg, state.params, level, slots_E)

  def loss_fn(tree):
    params = cms.with_level_params(state.params, tree)
    return seeding_loss(model, cfg, params, state.model_state, teacher, batch,
                        anchor)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(tree)
  grads = growth.mask_tree(grads, mask)
  updates, opt_state = tx.update(grads, state.opt_state, tree)
  tree = growth.apply_masked_updates(tree, updates, mask)
  metrics['grad_norm'] = optax.tree.norm(grads)
  return SeedingState(step=state.step + 1,
                      params=cms.with_level_params(state.params, tree),
                      model_state=state.model_state,
                      opt_state=opt_state), metrics


def init_seeding_state(cfg: SeedingConfig, params, model_state, level: int):
  return SeedingState(step=jnp.zeros((), jnp.int32), params=params,
                      model_state=model_state,
                      opt_state=make_optimizer(cfg).init(
                          cms.level_params(params, level)))


def seeding_state_shardings(model: nn.Module, cfg: SeedingConfig, level: int,
                            mesh, rules):
  """NamedShardings of a SeedingState (traced only, nothing built)."""
  def boxed_state(rng):
    variables = model.init(rng, jnp.zeros((1, 2), jnp.int32))
    params = variables.pop('params')
    return init_seeding_state(cfg, params, variables, level)
  _, shardings = sharding_lib.abstract_sharded(boxed_state, mesh, rules,
                                               jax.random.key(0))
  return shardings


def batch_keys(cfg: SeedingConfig) -> dict[str, int]:
  """The arrays a seeding batch holds for `cfg`, with their ranks."""
  keys = {}
  if cfg.alpha > 0:
    keys.update(gkd_tokens=2, gkd_mask=2)
  if cfg.alpha < 1:
    keys.update(lti_tokens=2, lti_mask=2, lti_advantages=1)
  if cfg.anchor_weight > 0:
    keys.update(anchor_tokens=2, anchor_mask=2)
  return keys


def compile_seeding_step(model: nn.Module, cfg: SeedingConfig, level: int,
                         mesh, rules):
  """`step(state, batch, teacher, slots_E, anchor=None) -> (state, metrics)`,
  jitted once.

  Cached per (model, cfg, level, mesh, rules), so every sleep cycle reuses
  the same compiled program; the state is donated, the teacher and the
  anchor are not. The anchor (pre-wake params, model_state) is an input
  laid out like the teacher, so a new anchor each cycle is new data, not a
  new program; with cfg.anchor_weight == 0 it is not an input at all.
  """
  # How the anchor's rows are sampled never reaches the program (only their
  # shapes do, which jit keys on anyway): one cache entry for every setting,
  # so at anchor_weight=0 the program is the one without anchor knobs.
  defaults = SeedingConfig()
  cfg = dataclasses.replace(cfg, **{
      name: getattr(defaults, name) for name in
      ('anchor_prompts', 'anchor_batch_size', 'anchor_max_new_tokens')})
  return _compile_seeding_step(model, cfg, level, mesh, rules)


@functools.lru_cache(maxsize=None)
def _compile_seeding_step(model: nn.Module, cfg: SeedingConfig, level: int,
                          mesh, rules):
  state_shardings = seeding_state_shardings(model, cfg, level, mesh, rules)
  replicated = sharding_lib.replicated(mesh)
  batch_shardings = {k: sharding_lib.batch_sharding(mesh, rules, ndim)
                     for k, ndim in batch_keys(cfg).items()}
  teacher_shardings = (state_shardings.params, state_shardings.model_state)
  in_shardings = (state_shardings, batch_shardings, teacher_shardings,
                  replicated)
  anchored = cfg.anchor_weight > 0
  if anchored:
    in_shardings += (teacher_shardings,)
  compiled = sharding_lib.compile_step(
      functools.partial(seeding_step, model, cfg, level), mesh, rules,
      in_shardings=in_shardings, out_shardings=(state_shardings, replicated))

  def step(state, batch, teacher, slots_E, anchor=None):
    # Rollouts come from the sampler wherever it left them: lay the batch
    # out over the mesh here.
    batch, slots_E = sharding_lib.put((batch, slots_E),
                                    (batch_shardings, replicated))
    if not anchored:
      return compiled(state, batch, teacher, slots_E)
    if anchor is None:
      raise ValueError(f'sleep.anchor_weight={cfg.anchor_weight} > 0 needs the '
                       'anchor model: pass anchor=(params, model_state).')
    return compiled(state, batch, teacher, slots_E, anchor)

  step.jitted = compiled.jitted
  step.state_shardings = state_shardings
  return step


# ------------------------------------------------------------- the stage ---


class Consolidation(NamedTuple):
  params: Any          # the student, now the model
  model_state: Any
  grown_slots: list[int]   # the new experts of level l* ([] w/o expansion)
  reset_slots: list[int]   # the freed experts of level l* - 1
  metrics: list[dict]      # per KS step


def _check(model, model_state, level: int, cfg: SeedingConfig, judge, decode):
  config = model.config
  if config.mlp != 'cms':
    raise ValueError(f"consolidation needs a CMS model; model.mlp={config.mlp!r}.")
  if not 1 <= level < len(config.cms_levels):
    raise ValueError(f'consolidate: level={level} must name a slower level with '
                     f'a faster one below it, in [1, {len(config.cms_levels) - 1}].')
  if cfg.alpha < 1 and cfg.gamma > 0 and (judge is None or decode is None):
    raise ValueError(f'sleep.gamma={cfg.gamma} > 0 needs a semantic judge and a '
                     'token decoder (pass judge= and decode=), or set '
                     'sleep.gamma=0.')
  growth.active_slots(model_state, level)  # clear error if the state is wrong


def _data_size(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in ('data', 'fsdp') if a in mesh.shape]))


def consolidate(model: nn.Module, params, model_state, *, level: int,
                replay: Mapping[str, np.ndarray], cfg: SeedingConfig, rng,
                bos_id: int, eos_id: int | None, pad_id: int = 0, judge=None,
                decode: Callable[[list[int]], str] | None = None, mesh=None,
                rules=sharding_lib.DEFAULT_RULES,
                on_step: Callable[[int, dict], None] | None = None,
                anchor_replay: Mapping[str, np.ndarray] | None = None
                ) -> Consolidation:
  """Knowledge Seeding for the level pair (level - 1 -> level).

  Builds teacher and student (module docstring), runs `cfg.num_steps` KS
  steps on prompts drawn from `replay` (see `draw_prompts`), and returns the
  student as the new model: the new expert active, level - 1's consolidated
  experts reset (free for the next wake). `rng` is a PRNG key; the same key,
  config and inputs give the same result.

  With cfg.anchor_weight > 0 the student at initialisation (= the pre-wake
  model) is kept frozen as the anchor; each step it continues
  `draw_anchor_prompts` prompts: BOS, or with anchor_prompts='replay'
  prefixes of `anchor_replay` ({'tokens', 'lengths'} rows of earlier
  sessions, like `replay`; None or empty falls back to BOS). Its keys and
  host draws are its own, so the GKD/LTI rollouts draw the same randomness
  whether the anchor is on or off.
  """
  _check(model, model_state, level, cfg, judge, decode)
  mesh = mesh or sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1},
                                        jax.local_devices()[:1])
  rules = tuple(tuple(r) for r in rules)
  anchored = cfg.anchor_weight > 0
  sizes = (('batch_size', cfg.batch_size),
           ('batch_size * group_size', cfg.batch_size * cfg.group_size))
  if anchored:
    sizes += (('anchor_batch_size', cfg.anchor_batch_size),)
  for name, rows in sizes:
    if rows % _data_size(mesh):
      raise ValueError(f'sleep.{name}={rows} must divide evenly over the '
                       f'{_data_size(mesh)} data-parallel devices of the mesh.')
  grow_rng, loop_rng = jax.random.split(rng)
  host_rng = np.random.default_rng(
      np.asarray(jax.random.key_data(loop_rng)).ravel().tolist())
  step_fn = compile_seeding_step(model, cfg, level, mesh, rules)
  shardings = step_fn.state_shardings
  # On the mesh first, so growth and reset see the same layout every cycle.
  teacher = sharding_lib.put((params, model_state),
                           (shardings.params, shardings.model_state))
  faster = level - 1
  reset_slots = growth.active_slots(model_state, faster)
  student_params, student_state = growth.reset(*teacher, faster, reset_slots)
  grown = []
  if cfg.expansion:
    for e in range(cfg.experts):
      # The first expert's key is the one a single-expert sleep uses.
      student_params, student_state, slot = growth.grow(
          student_params, student_state, level,
          grow_rng if e == 0 else jax.random.fold_in(grow_rng, e))
      grown.append(slot)
    slots = grown
  else:
    slots = growth.active_slots(student_state, level)
  slots_E = np.zeros(np.asarray(student_state[cms.CMS_COLLECTION][
      cms.level_name(level)]).shape, np.bool_)
  slots_E[slots] = True
  # A copy: the state is donated to the step, and must not take the caller's
  # (or the teacher's) buffers with it.
  state = sharding_lib.put(
      init_seeding_state(cfg, student_params, student_state, level), shardings,
      may_alias=False)
  slots_E = sharding_lib.put(jnp.asarray(slots_E), sharding_lib.replicated(mesh))
  anchor = None
  if anchored:
    # The pre-wake model, frozen: the state above is a copy, so the student's
    # initial buffers outlive the donations. Derived keys of its own (a
    # fold_in, not a split of loop_rng), so that turning the anchor on or
    # off leaves every other draw as it was.
    anchor = sharding_lib.put((student_params, student_state),
                            (shardings.params, shardings.model_state))
    anchor_rng = jax.random.fold_in(loop_rng, 1)
    anchor_host_rng = np.random.default_rng(
        np.asarray(jax.random.key_data(anchor_rng)).ravel().tolist())
  progress = metrics_lib.Progress(cfg.num_steps, what='KS step')
  history, pending = [], None
  for i in range(cfg.num_steps):
    loop_rng, step_rng = jax.random.split(loop_rng)
    prompts, prompt_lengths = seeding_rollouts.draw_prompts(
        replay, cfg, host_rng, bos_id, pad_id)
    out = seeding_rollouts.rollout(
        model, cfg, (state.params, state.model_state), teacher, prompts,
        prompt_lengths, step_rng, eos_id=eos_id, pad_id=pad_id,
        host_rng=host_rng, judge=judge, decode=decode)
    batch = out.batch
    if anchored:
      anchor_rng, anchor_step_rng = jax.random.split(anchor_rng)
      batch = {**batch, **seeding_rollouts.anchor_rollout(
          model, cfg, anchor, *seeding_rollouts.draw_anchor_prompts(
              anchor_replay, cfg, anchor_host_rng, bos_id, pad_id),
          anchor_step_rng, eos_id=eos_id, pad_id=pad_id)}
    state, step_metrics = step_fn(state, batch, teacher, slots_E, anchor)
    if pending is not None:  # fetch step i-1's metrics after dispatching step i
      history.append(_finish(pending, i - 1, on_step))
    pending = (step_metrics, out.metrics)
    progress.update(i + 1, {'loss': step_metrics['loss']},
                    force=i + 1 == cfg.num_steps)
  if pending is not None:
    history.append(_finish(pending, cfg.num_steps - 1, on_step))
  return Consolidation(params=state.params, model_state=state.model_state,
                       grown_slots=grown, reset_slots=reset_slots,
                       metrics=history)


def _finish(pending, step: int, on_step) -> dict:
  device_metrics, host_metrics = pending
  values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
  metrics_lib.check_finite(step + 1, values)
  values.update(host_metrics)
  if on_step is not None:
    on_step(step, values)
  return values
