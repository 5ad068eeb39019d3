"""The one sampler: KV-cache prefill, then a jitted `lax.while_loop` decode.

The decode loop tests its stop condition (every row done, or
`max_new_tokens` reached) once per `steps_per_check` steps: the steps in
between run as an inner loop of known trip count. On a GPU, XLA copies a
while loop's condition to the host and waits for it on every iteration,
unless the trip count is known; so checking once per step would stall the
host on the device after each token, while a block lets it queue the next
steps' kernels. Steps past the end of a block write nothing (a row that is
done, or a step past `max_new_tokens`, records nothing), so every
`steps_per_check` gives the same tokens. Elsewhere the default is 1 (no
wasted steps): XLA:CPU runs the loop on the host, and a TPU program keeps
its loop control on the chip.

Padding: prompts may be right-padded (`padding_side='right'`, the default:
row b holds its prompt in columns [0, len_b)) or left-padded
(`padding_side='left'`: columns [P - len_b, P)). Left-padded rows are shifted
to the right-padded layout before prefill, so token t of every prompt sits at
position t and both layouts give the same result.

`.logprobs[b, t]` is log p_model(token | prefix) under the raw logits
(temperature 1, before top-k/top-p filtering): the model's own probability
of what was emitted. Positions after a row's EOS hold `pad_id` and 0.

Compilation: one per (model config, batch, prompt length, max_new_tokens,
temperature, top_k, top_p, eos_id) — params and rng are traced.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.models.transformer import init_cache, variables


class SampleOutput(NamedTuple):
  tokens: jax.Array    # int32[B, max_new_tokens]
  logprobs: jax.Array  # float32[B, max_new_tokens]
  lengths: jax.Array   # int32[B]: generated tokens, EOS included


def _filter_logits(logits_BxV, top_k: int, top_p: float):
  """Masks (to -inf) tokens outside the top-k and outside the top-p nucleus."""
  if top_k > 0:
    kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_desc = -jnp.sort(-logits_BxV, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep a token if the mass strictly before it is below top_p (so the
    # most likely token is always kept).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_desc, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold, -jnp.inf, logits_BxV)
  return logits_BxV


def select_tokens(logits_BxV, rng, *, temperature: float, top_k: int,
                  top_p: float):
  """Picks the next token per row; returns (tokens int32[B], logprobs f32[B])."""
  if temperature == 0.0:
    tokens = jnp.argmax(logits_BxV, axis=-1)
  else:
    filtered = _filter_logits(logits_BxV / temperature, top_k, top_p)
    tokens = jax.random.categorical(rng, filtered, axis=-1)
  tokens = tokens.astype(jnp.int32)
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1),
                                 tokens[:, None], axis=-1)[:, 0]
  return tokens, logprobs


def to_right_padded(tokens_BxP, lengths_B):
  """Shifts left-padded rows so that each prompt starts at column 0."""
  width = tokens_BxP.shape[1]
  shift_B = width - lengths_B
  cols = (jnp.arange(width)[None, :] + shift_B[:, None]) % width
  return jnp.take_along_axis(tokens_BxP, cols, axis=1)


class _LoopState(NamedTuple):
  step: jax.Array
  cache: list
  last_token: jax.Array   # [B] token to feed at position `position`
  position: jax.Array     # [B]
  done: jax.Array         # [B] bool
  tokens: jax.Array       # [B, N]
  logprobs: jax.Array     # [B, N]
  lengths: jax.Array      # [B]
  rng: jax.Array


_STATIC_ARGS = ('model', 'random_expert', 'max_new_tokens', 'temperature',
                'top_k', 'top_p', 'eos_id', 'pad_id', 'padding_side')

# Decode steps per stop-condition check by backend (module docstring): a
# GPU waits for the host at every check; the others do not.
_STEPS_PER_CHECK = {'gpu': 8}


def _random_expert_args(rng, random_expert: bool):
  """apply() kwargs for CMS random-expert injection at a decode step.

  The injection key is folded out of the sampling key, so the token draws
  are the same with and without injection for a given rng.
  """
  if not random_expert:
    return lambda step: {}
  expert_rng = jax.random.fold_in(rng, 0x5EED)
  return lambda step: {'random_expert': True, 'rngs': {
      'random_expert': jax.random.fold_in(expert_rng, step)}}


def _initial_state(cache, lengths_B, rng, max_new_tokens, pad_id) -> _LoopState:
  batch = lengths_B.shape[0]
  return _LoopState(
      step=jnp.int32(0), cache=cache, last_token=jnp.zeros((batch,), jnp.int32),
      position=lengths_B.astype(jnp.int32), done=jnp.zeros((batch,), bool),
      tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
      logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
      lengths=jnp.zeros((batch,), jnp.int32), rng=rng)


def _record(state: _LoopState, token_B, logprob_B, eos_id, pad_id):
  """Writes step `state.step`'s token for the rows that are still running;
  a step past `max_new_tokens` (the end of a block) writes nothing."""
  live = ~state.done & (state.step < state.tokens.shape[1])
  token_B = jnp.where(live, token_B, pad_id)
  logprob_B = jnp.where(live, logprob_B, 0.0)
  tokens = state.tokens.at[:, state.step].set(token_B, mode='drop')
  logprobs = state.logprobs.at[:, state.step].set(logprob_B, mode='drop')
  lengths = state.lengths + live.astype(jnp.int32)
  done = state.done
  if eos_id is not None:
    done = done | (live & (token_B == eos_id))
  return tokens, logprobs, lengths, done


@functools.partial(jax.jit,
                   static_argnames=_STATIC_ARGS + ('steps_per_check',))
def _sample_cached(model, variables, prompt_BxP, lengths_B, rng, *,
                   max_new_tokens, temperature, top_k, top_p, eos_id, pad_id,
                   padding_side, random_expert, steps_per_check):
  batch, prompt_len = prompt_BxP.shape
  expert_args = _random_expert_args(rng, random_expert)
  if padding_side == 'left':
    prompt_BxP = to_right_padded(prompt_BxP, lengths_B)
  cache = init_cache(model.config, batch, prompt_len + max_new_tokens)
  logits, cache = model.apply(variables, prompt_BxP, cache=cache,
                              logit_index=lengths_B - 1,
                              **expert_args(0))
  last_logits_BxV = logits[:, 0]
  choose = functools.partial(select_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p)
  rng, step_rng = jax.random.split(rng)
  token_B, logprob_B = choose(last_logits_BxV, step_rng)
  state = _initial_state(cache, lengths_B, rng, max_new_tokens, pad_id)
  tokens, logprobs, lengths, done = _record(state, token_B, logprob_B, eos_id,
                                            pad_id)
  state = state._replace(step=jnp.int32(1), last_token=token_B, tokens=tokens,
                         logprobs=logprobs, lengths=lengths, done=done)

  def cond(s: _LoopState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: _LoopState):
    logits, cache = model.apply(variables, s.last_token[:, None],
                                positions=s.position[:, None], cache=s.cache,
                                **expert_args(s.step))
    rng, step_rng = jax.random.split(s.rng)
    token_B, logprob_B = choose(logits[:, 0], step_rng)
    tokens, logprobs, lengths, done = _record(s, token_B, logprob_B, eos_id,
                                              pad_id)
    return _LoopState(step=s.step + 1, cache=cache, last_token=token_B,
                      position=s.position + 1, done=done, tokens=tokens,
                      logprobs=logprobs, lengths=lengths, rng=rng)

  def block(s: _LoopState):
    return jax.lax.fori_loop(0, steps_per_check, lambda _, s: body(s), s)

  state = jax.lax.while_loop(cond, body if steps_per_check == 1 else block,
                             state)
  return SampleOutput(state.tokens, state.logprobs, state.lengths)


@functools.partial(jax.jit, static_argnames=_STATIC_ARGS)
def _sample_recompute(model, variables, prompt_BxP, lengths_B, rng, *,
                      max_new_tokens, temperature, top_k, top_p, eos_id, pad_id,
                      padding_side, random_expert):
  """Reference decoding without a cache: a full forward pass per new token,
  its stop condition checked every step."""
  batch, prompt_len = prompt_BxP.shape
  expert_args = _random_expert_args(rng, random_expert)
  if padding_side == 'left':
    prompt_BxP = to_right_padded(prompt_BxP, lengths_B)
  width = prompt_len + max_new_tokens
  buffer = jnp.full((batch, width), pad_id, jnp.int32).at[:, :prompt_len].set(
      prompt_BxP)
  rows = jnp.arange(batch)
  choose = functools.partial(select_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p)
  state = _initial_state([], lengths_B, rng, max_new_tokens, pad_id)

  def cond(carry):
    s, _ = carry
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(carry):
    s, buf = carry
    logits = model.apply(variables, buf, **expert_args(s.step))
    last_logits_BxV = logits[rows, s.position - 1]
    rng, step_rng = jax.random.split(s.rng)
    token_B, logprob_B = choose(last_logits_BxV, step_rng)
    tokens, logprobs, lengths, done = _record(s, token_B, logprob_B, eos_id,
                                              pad_id)
    buf = buf.at[rows, jnp.minimum(s.position, width - 1)].set(token_B)
    return (s._replace(step=s.step + 1, position=s.position + 1, done=done,
                       tokens=tokens, logprobs=logprobs, lengths=lengths,
                       rng=rng), buf)

  state, _ = jax.lax.while_loop(cond, body, (state, buffer))
  return SampleOutput(state.tokens, state.logprobs, state.lengths)


def _check_args(prompt_tokens, prompt_lengths, max_new_tokens, temperature,
                top_k, top_p, padding_side):
  if prompt_tokens.ndim != 2:
    raise ValueError(f'prompt_tokens must be int32[batch, length]; got shape '
                     f'{prompt_tokens.shape}.')
  if prompt_lengths.shape != prompt_tokens.shape[:1]:
    raise ValueError(f'prompt_lengths must have shape [{prompt_tokens.shape[0]}]'
                     f'; got {prompt_lengths.shape}.')
  if not isinstance(prompt_lengths, jax.core.Tracer):
    lengths = np.asarray(prompt_lengths)
    if lengths.size and (lengths.min() < 1 or lengths.max() > prompt_tokens.shape[1]):
      raise ValueError(f'prompt_lengths must be in [1, {prompt_tokens.shape[1]}] '
                       f'(the padded prompt width); got {lengths.tolist()}.')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1.')
  if temperature < 0:
    raise ValueError(f'temperature={temperature} must be >= 0 (0 = greedy).')
  if top_k < 0:
    raise ValueError(f'top_k={top_k} must be >= 0 (0 = no top-k filter).')
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p={top_p} must be in (0, 1] (1 = no nucleus filter).')
  if padding_side not in ('left', 'right'):
    raise ValueError(f"padding_side={padding_side!r}; valid: 'left', 'right'.")


def sample(model: nn.Module, params, prompt_tokens, prompt_lengths, *,
           max_new_tokens: int, rng, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
           padding_side: str = 'right', use_cache: bool = True,
           model_state=None, random_expert: bool = False,
           steps_per_check: int | None = None) -> SampleOutput:
  """Samples `max_new_tokens` continuations of a padded prompt batch.

  Args:
    model: a `sleep_jax.models.Transformer`.
    params: its params pytree.
    prompt_tokens: int32[B, P], padded on `padding_side`.
    prompt_lengths: int32[B], each in [1, P].
    max_new_tokens: tokens to generate per row (a row stops early at EOS).
    rng: a PRNG key (unused when greedy).
    temperature: 0 = greedy; otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = off).
    top_p: nucleus sampling mass (1.0 = off).
    eos_id: a row stops after emitting it (None = never stop early).
    pad_id: fills tokens after a row has stopped.
    padding_side: 'right' or 'left'.
    use_cache: False runs the full-recompute reference decoder.
    model_state: the model's non-param collections (a CMS model's expert
      masks, {'cms': ...}); None for a plain model.
    random_expert: CMS models only: every level adds one uniformly random
      active expert per token (dreaming, docs/design.md §5-6).
    steps_per_check: decode steps between checks of the stop condition
      of the cached decoder (module docstring); None = 8 on a GPU, 1
      elsewhere. The tokens are the same for every value.

  Returns:
    SampleOutput(tokens int32[B, N], logprobs f32[B, N], lengths int32[B]).
  """
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  _check_args(prompt_tokens, prompt_lengths, max_new_tokens, temperature,
              top_k, top_p, padding_side)
  if top_k > model.config.vocab_size:
    raise ValueError(f'top_k={top_k} exceeds the vocabulary '
                     f'({model.config.vocab_size}); use 0 to disable top-k.')
  if random_expert and model.config.mlp != 'cms':
    raise ValueError("random_expert=True needs a CMS model (mlp='cms').")
  if steps_per_check is None:
    steps_per_check = _STEPS_PER_CHECK.get(jax.default_backend(), 1)
  if steps_per_check < 1:
    raise ValueError(f'steps_per_check={steps_per_check} must be >= 1 (1 = '
                     'check the stop condition after every token).')
  fn = _sample_recompute
  if use_cache:
    fn = functools.partial(_sample_cached,
                           steps_per_check=int(steps_per_check))
  return fn(model, variables(params, model_state), prompt_tokens,
            prompt_lengths, rng, random_expert=bool(random_expert),
            max_new_tokens=int(max_new_tokens), temperature=float(temperature),
            top_k=int(top_k), top_p=float(top_p), eos_id=eos_id,
            pad_id=int(pad_id), padding_side=padding_side)
