"""Knowledge Seeding's rollouts: the host-side half of one KS step.

Each step of `seeding.consolidate` draws prompts (`draw_prompts`: replay
prefixes and/or BOS), samples with the shared sampler (sleep_jax.sampling)
and scores rewards, with no gradient, then hands the batch to the jitted
update (`seeding.compile_seeding_step`):

* GKD: a completion per prompt by the teacher or, with probability `lmbda`,
  by the student (`rollout`);
* LTI (GRPO without a KL term): each teacher completion is cut at a
  uniformly random length, the student samples G continuations of the cut,
  each is rewarded by gamma * r_sem + (1 - gamma) * r_abs against the
  teacher's continuation (sleep_jax.rewards), and the advantage is the
  reward minus its group's mean (`group_advantages`);
* the pre-wake anchor's own completions (`draw_anchor_prompts`,
  `anchor_rollout`).

Sequences are joined by `sleep_jax.sequences`. `cfg` is a
`sleep_jax.seeding.SeedingConfig`.
"""

from __future__ import annotations

import functools
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax import rewards
from sleep_jax import sampling
from sleep_jax.sequences import join


def draw_prompts(replay: Mapping[str, np.ndarray], cfg,
                 rng: np.random.Generator, bos_id: int, pad_id: int):
  """A batch of sleep prompts: replay prefixes and/or BOS (right-padded).

  `replay['tokens']` int[R, W] holds recent wake rows (BOS first) and
  `replay['lengths']` int[R] their lengths. A replay prompt keeps a uniformly
  random prefix of [min_prompt_tokens, length - 1] tokens, so there is always
  something left to continue.
  """
  batch = cfg.batch_size
  from_bos = {'replay': np.zeros(batch, bool), 'bos': np.ones(batch, bool),
              'mixed': rng.random(batch) < cfg.bos_fraction}[cfg.prompt_source]
  return _prefixes(replay, from_bos, cfg.min_prompt_tokens, rng, bos_id,
                   pad_id)


def _prefixes(replay, from_bos_B, min_prompt_tokens: int,
              rng: np.random.Generator, bos_id: int, pad_id: int):
  """draw_prompts' rows: BOS where `from_bos_B`, else a replay prefix."""
  tokens, lengths = np.asarray(replay['tokens']), np.asarray(replay['lengths'])
  batch, width = len(from_bos_B), tokens.shape[1]
  prompts = np.full((batch, width), pad_id, np.int32)
  prompt_lengths = np.ones((batch,), np.int32)
  rows = rng.integers(len(tokens), size=batch)
  for b in range(batch):
    if from_bos_B[b]:
      prompts[b, 0] = bos_id
      continue
    length = int(lengths[rows[b]])
    low = min(min_prompt_tokens, length - 1)
    keep = int(rng.integers(max(low, 1), max(length - 1, 1) + 1))
    prompts[b, :keep] = tokens[rows[b], :keep]
    prompt_lengths[b] = keep
  return prompts, prompt_lengths


def draw_anchor_prompts(anchor_replay: Mapping[str, np.ndarray] | None,
                        cfg, rng: np.random.Generator,
                        bos_id: int, pad_id: int):
  """`anchor_batch_size` prompts for the anchor's completions.

  'replay': prefixes of `anchor_replay` rows (earlier sessions; drawn as
  `draw_prompts` draws replay prefixes). 'bos', or no earlier rows (None or
  empty: the first session has none): BOS alone, int32[B, 1].
  """
  batch = cfg.anchor_batch_size
  if (cfg.anchor_prompts == 'bos' or anchor_replay is None
      or not len(anchor_replay['tokens'])):
    return (np.full((batch, 1), bos_id, np.int32), np.ones((batch,), np.int32))
  return _prefixes(anchor_replay, np.zeros(batch, bool), cfg.min_prompt_tokens,
                   rng, bos_id, pad_id)


@jax.jit
def _cut_dreams(dream_BxN, dream_len_B, u_B):
  """Uniform cut per dream: (cut, the reference continuation, its length)."""
  cut = jnp.minimum(jnp.floor(u_B * dream_len_B), jnp.maximum(dream_len_B - 1, 0)
                    ).astype(jnp.int32)
  cols = jnp.arange(dream_BxN.shape[1])[None, :] + cut[:, None]
  reference = jnp.take_along_axis(
      dream_BxN, jnp.minimum(cols, dream_BxN.shape[1] - 1), axis=1)
  ref_len = dream_len_B - cut
  reference = jnp.where(jnp.arange(dream_BxN.shape[1])[None] < ref_len[:, None],
                        reference, 0)
  return cut, reference, ref_len


def group_advantages(rewards_BxG, normalize: bool):
  """r - mean of its group (optionally / group std)."""
  centred = rewards_BxG - rewards_BxG.mean(axis=1, keepdims=True)
  if normalize:
    centred = centred / (rewards_BxG.std(axis=1, keepdims=True) + 1e-6)
  return centred


def anchor_rollout(model, cfg, anchor, prompts, prompt_lengths,
                   rng, *, eos_id, pad_id) -> dict:
  """The anchor's own completions of `prompts` (anchor = (params, state)), as
  batch rows {'anchor_tokens', 'anchor_mask'} (sequences.join's layout)."""
  prompts, prompt_lengths = jnp.asarray(prompts), jnp.asarray(prompt_lengths)
  out = sampling.sample(model, anchor[0], prompts, prompt_lengths,
                        max_new_tokens=cfg.anchor_max_new_tokens, rng=rng,
                        temperature=cfg.temperature, eos_id=eos_id,
                        pad_id=pad_id, model_state=anchor[1])
  tokens, mask = join(prompts, prompt_lengths, out.tokens, out.lengths,
                      pad_id=pad_id)
  return {'anchor_tokens': tokens, 'anchor_mask': mask}


class Rollout(NamedTuple):
  batch: dict
  metrics: dict


def rollout(model, cfg, student, teacher, prompts, prompt_lengths,
            rng, *, eos_id, pad_id, host_rng, judge=None, decode=None
            ) -> Rollout:
  """Samples GKD and LTI completions and scores LTI rewards; no gradients.

  student / teacher: (params, model_state).
  """
  t_rng, s_rng, l_rng = jax.random.split(rng, 3)
  sample = functools.partial(
      sampling.sample, model, max_new_tokens=cfg.max_new_tokens,
      temperature=cfg.temperature, eos_id=eos_id, pad_id=pad_id)
  prompts, prompt_lengths = jnp.asarray(prompts), jnp.asarray(prompt_lengths)
  by_teacher = sample(teacher[0], prompts, prompt_lengths, rng=t_rng,
                      model_state=teacher[1])
  batch, metrics = {}, {}
  if cfg.alpha > 0:
    by_student = sample(student[0], prompts, prompt_lengths, rng=s_rng,
                        model_state=student[1])
    size = cfg.batch_size if cfg.lmbda_mode == 'sample' else 1
    on_policy = np.broadcast_to(host_rng.random(size) < cfg.lmbda,
                                (cfg.batch_size,))
    pick = jnp.asarray(on_policy)
    completion = jnp.where(pick[:, None], by_student.tokens, by_teacher.tokens)
    lengths = jnp.where(pick, by_student.lengths, by_teacher.lengths)
    batch['gkd_tokens'], batch['gkd_mask'] = join(
        prompts, prompt_lengths, completion, lengths, pad_id=pad_id)
    metrics['on_policy_fraction'] = float(on_policy.mean())
  if cfg.alpha < 1:
    group = cfg.group_size
    cut, reference, ref_len = _cut_dreams(
        by_teacher.tokens, by_teacher.lengths,
        jnp.asarray(host_rng.random(cfg.batch_size), jnp.float32))
    prefix, _ = join(prompts, prompt_lengths, by_teacher.tokens, cut,
                     pad_id=pad_id)
    prefix_len = prompt_lengths + cut
    repeat = lambda x: jnp.repeat(x, group, axis=0)
    completions = sample(student[0], repeat(prefix), repeat(prefix_len),
                         rng=l_rng, model_state=student[1])
    r_abs = rewards.levenshtein_reward(
        completions.tokens, repeat(reference), z0=cfg.z0,
        pred_lengths=completions.lengths, ref_lengths=repeat(ref_len))
    reward = r_abs * (1.0 - cfg.gamma)
    if cfg.gamma > 0:
      same = judge.same_meaning(
          rewards.decode_rows(decode, completions.tokens, completions.lengths),
          rewards.decode_rows(decode, repeat(reference), repeat(ref_len)))
      reward = reward + cfg.gamma * same.astype(np.float32)
      metrics['semantic_reward'] = float(same.mean())
    advantages = group_advantages(reward.reshape(-1, group),
                                  cfg.normalize_advantages).reshape(-1)
    batch['lti_tokens'], batch['lti_mask'] = join(
        repeat(prefix), repeat(prefix_len), completions.tokens,
        completions.lengths, pad_id=pad_id)
    batch['lti_advantages'] = jnp.asarray(advantages, jnp.float32)
    metrics['reward'] = float(reward.mean())
    metrics['edit_reward'] = float(np.mean(r_abs))
  return Rollout(batch, metrics)
