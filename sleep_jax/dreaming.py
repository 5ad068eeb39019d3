"""Dreaming, the self-modifying stage of sleep (docs/design.md §5).

Given tasks (C, tau) — a context C and closed-book items about it — the model:

1. **generates** `num_dreams` continuations of `prompt(C)` with the shared
   sampler, random-expert injection on by default (`generate`);
2. **selects** per context the `keep_top` dreams whose LM-loss gradient best
   matches the context's own gradient (cosine, or `score='norm'`), plus
   `keep_random` others at random (`select`, `keep`);
3. **evaluates** each kept dream in an isolated copy: a fresh LoRA trained
   for `eval_steps` SFT steps on that dream alone, reward 1 iff tau rises
   over the same copy before SFT. All copies run in one jitted `vmap`
   (`dream_sft.evaluate`; `chunk_size` bounds memory), not one after
   another;
4. **ReST-EM**: for `rounds` rounds, SFT the dream generator's LoRA on the
   rewarded (prompt, dream) pairs, then sample again (`rest_em`);
5. **rehearses**: trains only the expert slots unlocked in this sleep on the
   accepted dreams, so dreaming cannot move older parameters
   (`dream_sft.rehearse`),
   with a generative-replay anchor: KL(A || model) on A's own BOS samples
   (`self_replay`, weight `rehearse_replay`). The new expert also fires on
   old inputs; without the anchor it overwrites old facts. A is the model
   before rehearsal, or the `anchor` model given to `dream`: sleep gives
   the pre-wake model, since the model after wake (and consolidation, which
   distils from it) carries wake's damage to old knowledge, and an anchor
   to it would hold that damage in place.

Our readings where the method is open (docs/design.md §5): the dream
generator is the model plus its own LoRA (`generator`), which only ReST-EM
trains; answers are always given by the model without it. Selection
gradients are taken with respect to a fixed, seeded LoRA's b factors at
b = 0, so g = scale * a^T dW per kernel:
a random projection of the kernel gradients, rank x out floats per kernel
per dream (the a factors' gradients are zero there and are not formed).
Every program is jitted once per shape, so a later sleep cycle reuses them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax import sampling
from sleep_jax.dream_sft import (CopyData, colocate, dream_copies, dream_rows,
                                 evaluate, rehearse, self_replay, sft_loss,
                                 train_generator)
from sleep_jax.models import lora
from sleep_jax.sequences import join
from sleep_jax.stage_config import dataclass_from_dict

# Prompt templates for text tasks; '{context}' is replaced by the passage.
TEMPLATES = {
    'continue': '{context}',
    'rewrite': '{context}\nThe same passage, in other words:\n',
    'implications': '{context}\nImplications of the passage above:\n',
    'self_qa': '{context}\nQuestions about the passage above, with answers:\n',
}
_TAU = ('accuracy', 'answer_logprob')


@dataclasses.dataclass(frozen=True)
class DreamingConfig:
  """Every knob of the dreaming stage (config keys `dreaming.*`)."""
  enabled: bool = True                # False: the "- dreaming" ablation
  num_dreams: int = 8                 # m per context
  max_new_tokens: int = 24
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  random_expert: bool = True          # False: the "- random expert" ablation
  template: str = 'continue'          # a key of TEMPLATES
  selection: str = 'gradient'         # 'random': "- gradient selection"
  score: str = 'cosine'               # or 'norm'
  keep_top: int = 2                   # k per context
  keep_random: int = 1                # b per context
  tau: str = 'accuracy'               # or 'answer_logprob'
  eval_steps: int = 4
  eval_learning_rate: float = 1e-2
  chunk_size: int = 0                 # copies per vmapped chunk; 0 = all
  rounds: int = 2                     # R of ReST-EM
  rest_steps: int = 30
  rest_batch_size: int = 8
  rest_learning_rate: float = 3e-3
  rehearse_steps: int = 300
  rehearse_batch_size: int = 32
  rehearse_learning_rate: float = 3e-3
  rehearse_replay: float = 2.0        # weight of the self-replay KL term
  replay_samples: int = 2048          # BOS samples of the model before sleep
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: tuple[tuple[str, int], ...] = lora.ALL_KERNELS

  def __post_init__(self):
    def need(ok, key, fix):
      if not ok:
        raise ValueError(f'dreaming.{key}={getattr(self, key)!r} {fix}.')
    for key in ('num_dreams', 'max_new_tokens', 'eval_steps', 'rest_batch_size',
                'rehearse_batch_size'):
      need(isinstance(getattr(self, key), int) and getattr(self, key) >= 1,
           key, 'must be an integer >= 1')
    for key in ('keep_top', 'keep_random', 'rounds', 'rest_steps',
                'rehearse_steps', 'chunk_size'):
      need(isinstance(getattr(self, key), int) and getattr(self, key) >= 0,
           key, 'must be an integer >= 0')
    need(self.keep_top + self.keep_random >= 1, 'keep_top',
         'plus keep_random must keep at least one dream')
    need(self.keep_top + self.keep_random <= self.num_dreams, 'keep_top',
         f'plus keep_random={self.keep_random} must be <= num_dreams='
         f'{self.num_dreams}')
    need(self.temperature >= 0, 'temperature', 'must be >= 0 (0 = greedy)')
    need(isinstance(self.top_k, int) and self.top_k >= 0, 'top_k',
         'must be an integer >= 0 (0 = no top-k filter)')
    need(self.rehearse_replay >= 0, 'rehearse_replay', 'must be >= 0 (0 = off)')
    need(isinstance(self.replay_samples, int) and self.replay_samples >= 1,
         'replay_samples', 'must be an integer >= 1')
    need(0 < self.top_p <= 1, 'top_p', 'must be in (0, 1]')
    need(self.template in TEMPLATES, 'template', f'is not one of {sorted(TEMPLATES)}')
    need(self.selection in ('gradient', 'random'), 'selection',
         "must be 'gradient' or 'random'")
    need(self.score in ('cosine', 'norm'), 'score', "must be 'cosine' or 'norm'")
    need(self.tau in _TAU, 'tau', f'must be one of {_TAU}')
    for key in ('eval_learning_rate', 'rest_learning_rate',
                'rehearse_learning_rate'):
      need(getattr(self, key) > 0, key, 'must be > 0')
    self.lora  # validates rank, alpha and targets

  @property
  def lora(self) -> lora.LoraConfig:
    try:
      return lora.LoraConfig(self.lora_rank, self.lora_alpha,
                             self.lora_targets)
    except ValueError as e:
      raise ValueError(f'dreaming: {e}'.replace('lora.', 'dreaming.lora_')
                       ) from None

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], key: str = 'dreaming'
                ) -> 'DreamingConfig':
    values = dict(values)
    if 'lora_targets' in values:
      values['lora_targets'] = lora.hashable_targets(values['lora_targets'])
    return dataclass_from_dict(cls, values, key)


class Tasks(NamedTuple):
  """C contexts with their prompts and Q closed-book items each.

  prompts / prompt_lengths: int32 [C, P] right-padded `prompt(C)`, [C];
  contexts / context_lengths: int32 [C, W] the context alone (BOS first),
  used for the selection gradient; items: `eval.encode_items` arrays with a
  context axis, inputs / targets / answer_mask [C, Q, L].
  to_copy_data: how dreams become their isolated copies' training data,
  f(dreams [n, N], lengths [n], context_index [n], host_rng) -> CopyData
  with a leading n (`arc_dreams.make_arc_tasks`: a dream is a training
  strategy); None: a dream is text to learn (`copy_data`: BOS + dream).
  """
  prompts: np.ndarray
  prompt_lengths: np.ndarray
  contexts: np.ndarray
  context_lengths: np.ndarray
  items: Mapping[str, np.ndarray]
  to_copy_data: Callable[..., CopyData] | None = None


def render_prompts(tokenizer, contexts: list[str], template: str, width: int):
  """`TEMPLATES[template]` around each context, tokenised with BOS: [C, width]."""
  return pad_rows([tokenizer.encode(TEMPLATES[template].format(context=c),
                                    add_bos=True) for c in contexts],
                  width, tokenizer.pad_id, 'a dream prompt')


def pad_rows(rows: list[list[int]], width: int, pad_id: int, what: str):
  """Right-padded int32 [len(rows), width] and the lengths."""
  longest = max(map(len, rows))
  if longest > width:
    raise ValueError(f'{what} has {longest} tokens > width {width}; raise the '
                     'width or shorten the contexts.')
  tokens = np.full((len(rows), width), pad_id, np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  return tokens, np.asarray([len(r) for r in rows], np.int32)


def make_tasks(tokenizer, contexts: list[str],
               items: list[Mapping[str, np.ndarray]], template: str,
               width: int) -> Tasks:
  """Tasks from context texts and each one's `eval.encode_items` arrays
  (the same number of items per context)."""
  prompts = render_prompts(tokenizer, contexts, template, width)
  context_rows = render_prompts(tokenizer, contexts, 'continue', width)
  return Tasks(*prompts, *context_rows,
               {k: np.stack([x[k] for x in items]) for k in items[0]})


# --------------------------------------------------------------- generate ---


def generate(model: nn.Module, params, model_state, generator, tasks: Tasks,
             cfg: DreamingConfig, rng, *, eos_id: int, pad_id: int):
  """`num_dreams` samples per context: (tokens [C*m, N], lengths [C*m]).

  Row i is a dream about context i // num_dreams. `generator` is the dream
  LoRA (None = the model itself).
  """
  m = cfg.num_dreams
  prompts = np.repeat(tasks.prompts, m, axis=0)
  lengths = np.repeat(tasks.prompt_lengths, m, axis=0)
  gen_params = params if generator is None else _merge(params, generator,
                                                       cfg.lora)
  out = sampling.sample(
      model, gen_params, prompts, lengths, max_new_tokens=cfg.max_new_tokens,
      rng=rng, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
      eos_id=eos_id, pad_id=pad_id, model_state=model_state,
      random_expert=cfg.random_expert)
  return out.tokens, out.lengths


@functools.partial(jax.jit, static_argnums=2)
def _merge(params, adapter, cfg: lora.LoraConfig):
  return lora.merge(params, adapter, cfg)


# ----------------------------------------------------------------- select ---


def _flat(tree):
  return jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(tree)])


@functools.partial(jax.jit, static_argnums=(0, 1))
def gradient_scores(model: nn.Module, cfg: DreamingConfig, params, model_state,
                    rng, dream_tokens, dream_masks, context_tokens,
                    context_masks, context_index):
  """Per-dream score [n]: cosine(g_dream, g_its_context) or ||g_dream||.

  Gradients are of the SFT loss with respect to a seeded LoRA only (module
  docstring), one dream per vmapped lane.
  """
  adapter = lora.init(params, cfg.lora, rng)
  # At b = 0 the gradient of every `a` is zero: take it for the b's alone.
  with_b = lambda b: {k: {'a': f['a'], 'b': b[k]} for k, f in adapter.items()}
  b0 = {k: f['b'] for k, f in adapter.items()}

  def grad_of(tokens_L, mask_L):
    loss = lambda b: sft_loss(model, params, model_state, tokens_L[None],
                              mask_L[None], with_b(b), cfg)
    return _flat(jax.grad(loss)(b0))

  g_dreams = jax.vmap(grad_of)(dream_tokens, dream_masks)
  if cfg.score == 'norm':
    return jnp.linalg.norm(g_dreams, axis=-1)
  g_contexts = jax.vmap(grad_of)(context_tokens, context_masks)[context_index]
  dot = (g_dreams * g_contexts).sum(-1)
  norms = jnp.linalg.norm(g_dreams, axis=-1) * jnp.linalg.norm(g_contexts, axis=-1)
  return dot / jnp.maximum(norms, 1e-12)


def keep(scores_CxM: np.ndarray | None, num_contexts: int, cfg: DreamingConfig,
         rng: np.random.Generator,
         duplicate_CxM: np.ndarray | None = None) -> np.ndarray:
  """Indices [C, k+b] into the C*m dreams: per context the top `keep_top` by
  score, then `keep_random` others uniformly; all random when `scores_CxM` is
  None. No dream is kept twice. A dream marked in `duplicate_CxM` (the same
  text as an earlier dream of its context) is kept only when its context has
  fewer than k+b distinct dreams: greedy sampling without random experts
  repeats itself, and a repeat teaches nothing new."""
  m, k, b = cfg.num_dreams, cfg.keep_top, cfg.keep_random
  rows = []
  for c in range(num_contexts):
    dup = (np.zeros(m, bool) if duplicate_CxM is None
           else np.asarray(duplicate_CxM[c], bool))
    if scores_CxM is None:
      chosen = _draw(rng, np.arange(m), dup, k + b)
    else:
      order = np.argsort(-np.asarray(scores_CxM[c]), kind='stable')
      order = np.concatenate([order[~dup[order]], order[dup[order]]])
      chosen = np.concatenate([order[:k], _draw(rng, order[k:], dup, b)])
    rows.append(c * m + chosen)
  return np.asarray(rows, np.int32)


def _draw(rng: np.random.Generator, candidates: np.ndarray, dup: np.ndarray,
          n: int) -> np.ndarray:
  """n distinct `candidates` uniformly, non-duplicates first: the duplicates
  only fill what the others cannot."""
  fresh, repeats = candidates[~dup[candidates]], candidates[dup[candidates]]
  if len(fresh) >= n:
    return rng.choice(fresh, size=n, replace=False)
  return np.concatenate([fresh, rng.choice(repeats, size=n - len(fresh),
                                           replace=False)])


def duplicates(dreams: np.ndarray, lengths: np.ndarray,
               num_dreams: int) -> np.ndarray:
  """Bool [C, m]: dream j of a context is the same text as one of its
  dreams 0..j-1."""
  rows = [dreams[i, :lengths[i]].tobytes() for i in range(len(dreams))]
  out = np.zeros(len(rows), bool)
  for start in range(0, len(rows), num_dreams):
    seen = set()
    for i in range(start, start + num_dreams):
      out[i] = rows[i] in seen
      seen.add(rows[i])
  return out.reshape(-1, num_dreams)


def select(model: nn.Module, params, model_state, tasks: Tasks,
           data: CopyData, cfg: DreamingConfig, rng, host_rng,
           duplicate_CxM: np.ndarray | None = None):
  """(kept indices [C*(k+b)], scores [C*m] or None for random selection).

  `data` holds every dream's copy data (`copy_data`); a dream's gradient is
  that of its first training row (for a text dream, BOS + the dream).
  `duplicate_CxM` (`duplicates`) marks repeated dreams, kept last (`keep`).
  """
  num_contexts = len(tasks.prompts)
  if cfg.selection == 'random':
    return keep(None, num_contexts, cfg, host_rng,
                duplicate_CxM).reshape(-1), None
  tokens, masks = data.tokens[:, 0, 0], data.mask[:, 0, 0]
  ctx = jnp.asarray(tasks.contexts)
  ctx_len = jnp.asarray(tasks.context_lengths)
  # The whole context is the data: mask every position that predicts one of
  # its tokens after BOS.
  col = jnp.arange(ctx.shape[1])[None, :]
  ctx_masks = (col < ctx_len[:, None] - 1).astype(jnp.float32)
  index = jnp.repeat(jnp.arange(num_contexts), cfg.num_dreams)
  scores = gradient_scores(model, cfg, params, model_state, rng, tokens, masks,
                           ctx, ctx_masks, index)
  scores = np.asarray(scores)
  kept = keep(scores.reshape(num_contexts, cfg.num_dreams), num_contexts, cfg,
              host_rng, duplicate_CxM)
  return kept.reshape(-1), scores


def copy_data(tasks: Tasks, cfg: DreamingConfig, dreams, lengths, context,
              host_rng, *, bos_id: int, pad_id: int) -> CopyData:
  """The isolated copies' training data for `dreams` (numpy, leading n):
  `tasks.to_copy_data`, or text dreams by default (`dream_sft.dream_copies`
  of BOS + dream)."""
  if tasks.to_copy_data is not None:
    return tasks.to_copy_data(dreams, lengths, context, host_rng)
  tokens, masks = dream_rows(dreams, lengths, bos_id=bos_id, pad_id=pad_id)
  return CopyData(*(np.asarray(x) for x in dream_copies(tokens, masks, cfg)))


# ---------------------------------------------------------------- the stage ---


class Dreaming(NamedTuple):
  params: Any                 # after rehearsal
  generator: Any              # the dream LoRA after ReST-EM
  rounds: list[dict]          # per E-step: reward fraction, tau, ...
  accepted: dict              # rewarded dreams as SFT rows: tokens, mask
                              # [A, L] (A = 0 when none, or dreaming is off)


def rest_em(model: nn.Module, cfg: DreamingConfig, params, model_state,
            tasks: Tasks, rng, *, bos_id: int, eos_id: int, pad_id: int,
            generator=None, host_rng: np.random.Generator | None = None,
            on_round: Callable[[dict], None] | None = None):
  """Rounds 0..R of generate -> select -> evaluate, with an M-step (SFT of
  the dream LoRA on rewarded pairs) after each of the first R.

  Returns (generator, per-round stats, the rows the rewarded copies of
  every round trained on, deduplicated: {'tokens', 'mask'} [A, L]; for text
  dreams, BOS + dream).
  """
  host_rng = host_rng or np.random.default_rng(0)
  if generator is None:
    generator = lora.init(params, cfg.lora, jax.random.fold_in(rng, 7))
  generator = colocate(generator, params)
  items = {k: np.asarray(v) for k, v in tasks.items.items()}
  rounds, accepted = [], {}
  for r in range(cfg.rounds + 1):
    key = jax.random.fold_in(rng, r)
    dreams, lengths = generate(model, params, model_state, generator, tasks,
                               cfg, jax.random.fold_in(key, 0), eos_id=eos_id,
                               pad_id=pad_id)
    dreams, lengths = np.asarray(dreams), np.asarray(lengths)
    data = copy_data(tasks, cfg, dreams, lengths,
                     np.arange(len(dreams)) // cfg.num_dreams, host_rng,
                     bos_id=bos_id, pad_id=pad_id)
    kept, _ = select(model, params, model_state, tasks, data, cfg,
                     jax.random.fold_in(key, 1), host_rng,
                     duplicates(dreams, lengths, cfg.num_dreams))
    context = kept // cfg.num_dreams
    data = CopyData(*(x[kept] for x in data))
    result = evaluate(model, cfg, params, model_state,
                      jax.random.fold_in(key, 2), data,
                      {k: v[context] for k, v in items.items()})
    reward = np.asarray(result.reward) > 0
    stats = {'round': r, 'reward_fraction': float(reward.mean()),
             'tau_before': float(np.mean(result.tau_before)),
             'tau_after': float(np.mean(result.tau_after)),
             'kept': int(len(kept)), 'rewarded': int(reward.sum())}
    for i in np.flatnonzero(reward):  # the rows its copy trained on
      for s in np.flatnonzero(data.active[i]):
        for row, row_mask in zip(data.tokens[i, s], data.mask[i, s]):
          accepted.setdefault(row.tobytes(), (row, row_mask))
    if r < cfg.rounds and reward.any():
      # Rows for every kept dream (one shape every round), then the winners.
      rows, row_masks = join(tasks.prompts[context],
                             tasks.prompt_lengths[context], dreams[kept],
                             lengths[kept], pad_id=pad_id)
      generator, stats['generator_loss'] = train_generator(
          model, cfg, params, model_state, generator,
          np.asarray(rows)[reward], np.asarray(row_masks)[reward], host_rng)
    rounds.append(stats)
    if on_round:
      on_round(stats)
  width = data.tokens.shape[-1]
  acc = {'tokens': np.zeros((0, width), np.int32),
         'mask': np.zeros((0, width), np.float32)}
  if accepted:
    acc = {'tokens': np.stack([t for t, _ in accepted.values()]),
           'mask': np.stack([m for _, m in accepted.values()])}
  return generator, rounds, acc


def dream(model: nn.Module, cfg: DreamingConfig, params, model_state,
          tasks: Tasks, rng, *, level: int, slots, bos_id: int, eos_id: int,
          pad_id: int, generator=None, seed: int = 0,
          on_round: Callable[[dict], None] | None = None,
          anchor=None) -> Dreaming:
  """The whole stage: ReST-EM, then rehearsal of the `slots` of `level`
  unlocked in this sleep on every accepted dream. `cfg.enabled=False`
  returns the params unchanged.

  anchor: (params, model_state) of the model that rehearsal's replay term
  samples from and stays close to (module docstring); None = the model
  before rehearsal (`params`, `model_state`)."""
  if not cfg.enabled:
    return Dreaming(params, generator, [], {
        'tokens': np.zeros((0, 0), np.int32),
        'mask': np.zeros((0, 0), np.float32)})
  host_rng = np.random.default_rng(seed)
  generator, rounds, accepted = rest_em(
      model, cfg, params, model_state, tasks, rng, bos_id=bos_id,
      eos_id=eos_id, pad_id=pad_id, generator=generator, host_rng=host_rng,
      on_round=on_round)
  if len(accepted['tokens']) and cfg.rehearse_steps:
    replay = None
    if cfg.rehearse_replay > 0:
      replay = self_replay(model, cfg, params, model_state,
                           jax.random.fold_in(rng, 11), bos_id=bos_id,
                           eos_id=eos_id, pad_id=pad_id, anchor=anchor)
    params, _ = rehearse(model, cfg, params, model_state, accepted['tokens'],
                         accepted['mask'], level=level, slots=slots,
                         host_rng=host_rng, replay=replay, anchor=anchor)
  return Dreaming(params, generator, rounds, accepted)


def dream_unrewarded(model: nn.Module, cfg: DreamingConfig, params,
                     model_state, tasks: Tasks, rng, *, level: int, slots,
                     bos_id: int, eos_id: int, pad_id: int, generator=None,
                     seed: int = 0, anchor=None) -> Dreaming:
  """Dreaming on contexts whose evaluation items must stay unseen: generate
  with `generator` (trained by ReST-EM on other contexts), select
  (`cfg.selection`; the gradient score needs the context only), and
  rehearse every kept dream into `slots` of `level`. No tau, no reward:
  `tasks.items` is not read, so held-out questions never reach a signal.
  `accepted` holds the kept dreams' rows."""
  if not cfg.enabled:
    return dream(model, cfg, params, model_state, tasks, rng, level=level,
                 slots=slots, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                 generator=generator)
  host_rng = np.random.default_rng(seed)
  if generator is not None:
    generator = colocate(generator, params)
  dreams, lengths = generate(model, params, model_state, generator, tasks,
                             cfg, jax.random.fold_in(rng, 0), eos_id=eos_id,
                             pad_id=pad_id)
  dreams, lengths = np.asarray(dreams), np.asarray(lengths)
  data = copy_data(tasks, cfg, dreams, lengths,
                   np.arange(len(dreams)) // cfg.num_dreams, host_rng,
                   bos_id=bos_id, pad_id=pad_id)
  kept, _ = select(model, params, model_state, tasks, data, cfg,
                   jax.random.fold_in(rng, 1), host_rng,
                   duplicates(dreams, lengths, cfg.num_dreams))
  tokens = np.asarray(data.tokens)[kept][:, 0, 0]
  mask = np.asarray(data.mask)[kept][:, 0, 0]
  if cfg.rehearse_steps:
    replay = None
    if cfg.rehearse_replay > 0:
      replay = self_replay(model, cfg, params, model_state,
                           jax.random.fold_in(rng, 11), bos_id=bos_id,
                           eos_id=eos_id, pad_id=pad_id, anchor=anchor)
    params, _ = rehearse(model, cfg, params, model_state, tokens, mask,
                         level=level, slots=slots, host_rng=host_rng,
                         replay=replay, anchor=anchor)
  return Dreaming(params, generator, [], {'tokens': tokens, 'mask': mask})
