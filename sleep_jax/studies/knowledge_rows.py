"""The knowledge study's rows, one unit (row group, regime, seed) at a time.

LoRA fine-tuning on each passage's texts (`passage_finetune`, and with
self-edits `implications_finetune` and `seal`); the self-edits and the
ReST-EM generator that writes them; Sleep's wake, Knowledge Seeding and
dreaming (`sleep_unit`); `run_unit` picks a unit's rows. The table and
the shared setup: `knowledge_setup`; the run over units: `knowledge`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from sleep_jax import dreaming
from sleep_jax import dream_sft
from sleep_jax import growth
from sleep_jax import metrics as metrics_lib
from sleep_jax import seeding
from sleep_jax import sharding as sharding_lib
from sleep_jax import wake as wake_lib
from sleep_jax.models import lora
from sleep_jax.stage_config import with_overrides
from sleep_jax.studies import knowledge_qa as qa
from sleep_jax.studies.knowledge_setup import GRADERS
from sleep_jax.studies.knowledge_setup import SLEEP_VARIANTS
from sleep_jax.studies.knowledge_setup import Setup
from sleep_jax.studies.knowledge_setup import answers
from sleep_jax.studies.knowledge_setup import grade


@dataclasses.dataclass(frozen=True)
class LoraSft:
  """What `dream_sft.fit_copies` reads of a config."""
  lora: lora.LoraConfig
  chunk_size: int = 0


# ----------------------------------------------------------- LoRA rows ---


def lora_sft(finetune) -> LoraSft:
  """The fine-tuning rows' LoRA, from the `finetune` config keys."""
  return LoraSft(lora.LoraConfig(int(finetune.lora_rank),
                                 float(finetune.lora_alpha),
                                 lora.hashable_targets(finetune.lora_targets)),
                 int(finetune.chunk_size))


def _copy_data(rows_list: list[dict], steps: int, batch_size: int,
               learning_rate: float, host: np.random.Generator):
  """One LoRA copy per entry of `rows_list` ({'inputs','targets','mask'}),
  `steps` Adam steps of `batch_size` rows drawn from its own rows."""
  tokens, masks = [], []
  for rows in rows_list:
    idx = host.integers(len(rows['inputs']), size=(steps, batch_size))
    # fit_copies reads whole rows (mask at positions that predict the next
    # token): BOS, then every target.
    full = np.concatenate([rows['inputs'][:, :1], rows['targets']], 1)
    mask = np.concatenate([rows['mask'], np.zeros_like(rows['mask'][:, :1])],
                          1)
    tokens.append(full[idx])
    masks.append(mask[idx])
  n = len(rows_list)
  return dream_sft.CopyData(np.stack(tokens), np.stack(masks),
                            np.full((n,), learning_rate, np.float32),
                            np.ones((n, steps), bool))


def _lora_row(s: Setup, regime: str, texts_per_passage: list[list[str]],
              rng, host) -> dict:
  """LoRA fine-tuning on each passage's texts (single: one copy per
  passage, vmapped; cpt: one copy on all), then closed-book answers."""
  ft, b = s.config.finetune, s.backbone
  cfg = lora_sft(s.config.finetune)
  width = int(s.config.widths.passage)
  rows = [qa.text_rows(b, texts, width) for texts in texts_per_passage]
  if regime == 'cpt':
    rows = [{k: np.concatenate([r[k] for r in rows]) for k in rows[0]}]
    steps = int(ft.cpt_steps)
  else:
    steps = int(ft.steps)
  data = _copy_data(rows, steps, int(ft.batch_size), float(ft.learning_rate),
                    host)
  adapters = dream_sft.fit_copies(b.model, cfg, b.params, b.model_state, rng,
                                  data)
  if regime == 'cpt':
    merged = lora.merge(b.params, lora.take(adapters, 0), cfg.lora)
    return grade(s, s.eval, answers(s, s.eval, merged))
  predictions = []
  for i, passage in enumerate(s.eval):
    merged = lora.merge(b.params, lora.take(adapters, i), cfg.lora)
    predictions += answers(s, [passage], merged)
  return grade(s, s.eval, predictions)


# ------------------------------------------------------------ self-edits ---


def edit_tasks(s: Setup, passages, *, with_items: bool,
               backbone: qa.Backbone | None = None) -> dreaming.Tasks:
  """Dreaming tasks: the self-edit prompt of each passage, the passage
  itself (BOS first, for the gradient score), and for training passages
  only the answer items tau scores."""
  b = backbone or s.backbone
  widths, tok = s.config.widths, b.tokenizer
  prompts = qa.pad([qa.encode(b, qa.self_edit_prompt(b, p.context))
                    for p in passages], int(widths.self_edit_prompt),
                   tok.pad_id, 'a self-edit prompt')
  contexts = qa.pad([tok.encode(p.context, add_bos=True)[:int(widths.passage)]
                     for p in passages], int(widths.passage), tok.pad_id,
                    'a passage')
  items = (qa.answer_items(b, passages, int(widths.item),
                           int(s.config.data.max_questions))
           if with_items else {})
  return dreaming.Tasks(*prompts, *contexts, items)


def self_edits(s: Setup, cfg: dreaming.DreamingConfig, generator, rng,
               backbone=None, params=None) -> list[list[str]]:
  """`cfg.num_dreams` self-edits per evaluated passage, as texts."""
  b = backbone or s.backbone
  tasks = edit_tasks(s, s.eval, with_items=False, backbone=b)
  tokens, lengths = dreaming.generate(
      b.model, b.params if params is None else params, b.model_state,
      generator, tasks, cfg, rng, eos_id=b.tokenizer.eos_id,
      pad_id=b.tokenizer.pad_id)
  tokens, lengths = jax.device_get((tokens, lengths))
  texts = [b.tokenizer.decode(tokens[i, :lengths[i]].tolist())
           for i in range(len(tokens))]
  m = cfg.num_dreams
  return [texts[i * m:(i + 1) * m] for i in range(len(s.eval))]


def train_generator(s: Setup, cfg: dreaming.DreamingConfig, rng, seed: int,
                    log: Callable[[str], None], backbone=None, params=None,
                    model_state=None):
  """ReST-EM on the training passages: (generator LoRA, per-round stats)."""
  b = backbone or s.backbone
  tasks = edit_tasks(s, s.train, with_items=True, backbone=b)
  generator, rounds, _ = dreaming.rest_em(
      b.model, cfg, b.params if params is None else params,
      b.model_state if model_state is None else model_state, tasks, rng,
      host_rng=np.random.default_rng(seed), **s.ids,
      on_round=lambda r: log(f"ReST-EM round {r['round']}: "
                             f"{r['rewarded']}/{r['kept']} self-edits "
                             f"rewarded"))
  return generator, rounds


# ------------------------------------------------------------------ sleep ---


_WAKE_STEPS = {}


def _wake_step(s: Setup, model, seq_len: int):
  """The compiled wake step, built once per (model, width, mesh): each
  passage of the single regime reuses it."""
  key = (model, seq_len, s.mesh, s.rules)
  if key not in _WAKE_STEPS:
    example = np.zeros((1, seq_len), np.int32)
    shardings = wake_lib.wake_state_shardings(model, s.mesh, s.rules, example)
    _WAKE_STEPS[key] = (wake_lib.compile_wake_step(model, shardings, s.mesh,
                                                   s.rules), shardings)
  return _WAKE_STEPS[key]


def wake(s: Setup, b: qa.Backbone, params, model_state, passages, rng):
  """Each fast level grows one expert; the fast levels then read the
  passages in order, `wake.steps` steps each (batch 1), online."""
  fast = [l for l, lvl in enumerate(b.model.config.cms_levels) if lvl.chunk_size]
  for i, level in enumerate(fast):
    params, model_state, _ = growth.grow(params, model_state, level,
                                         jax.random.fold_in(rng, i))
  width = int(s.config.widths.passage)
  rows = qa.text_rows(b, [p.context for p in passages], width)
  step, shardings = _wake_step(s, b.model, width)
  state = sharding_lib.put(
      wake_lib.init_wake_state(b.model.config, params, model_state), shardings,
      may_alias=False)
  steps = int(s.config.wake.steps)
  losses = []
  for p in range(len(passages)):
    batch = {k: v[p:p + 1] for k, v in rows.items()}
    for i in range(steps):
      last = p == len(passages) - 1 and i == steps - 1
      state, metrics = step(state, batch, last)
      losses.append(metrics['loss'])
  metrics_lib.check_finite(len(losses), {'wake_loss': float(losses[-1])})
  return state.params, state.model_state


def consolidate(s: Setup, b: qa.Backbone, params, model_state, passages, rng):
  """Knowledge Seeding level by level, fastest pair first, on prefixes of
  the passages; returns (params, model_state, the slowest level's new
  slots)."""
  cfg = seeding.SeedingConfig.from_dict(s.config.sleep.to_dict())
  tok = b.tokenizer
  width = int(s.config.widths.passage)
  replay = qa.pad([tok.encode(p.context, add_bos=True)[:width]
                   for p in passages], width, tok.pad_id, 'a passage')
  replay = {'tokens': replay[0], 'lengths': replay[1]}
  grown = []
  for level in range(1, len(b.model.config.cms_levels)):
    out = seeding.consolidate(
        b.model, params, model_state, level=level, replay=replay, cfg=cfg,
        rng=jax.random.fold_in(rng, level), judge=s.judge,
        decode=tok.decode, mesh=s.mesh, rules=s.rules, **s.ids)
    params, model_state, grown = out.params, out.model_state, out.grown_slots
  return params, model_state, grown


def _sleep_configs(s: Setup, rows) -> dict[str, dreaming.DreamingConfig]:
  base = dreaming.DreamingConfig.from_dict(s.config.dreaming.to_dict())
  return {name: dataclasses.replace(base, **over)
          for name, over in SLEEP_VARIANTS.items() if name in rows}


def sleep_unit(s: Setup, regime: str, rows, generators: dict, rng, seed: int,
               log, backbone=None) -> tuple[dict, dict]:
  """The Sleep rows of one regime and seed, and the per-stage scores
  (after wake, after consolidation, after dreaming)."""
  b = backbone or s.backbone
  configs = _sleep_configs(s, rows)
  groups = [[p] for p in s.eval] if regime == 'single' else [s.eval]
  predictions = {name: [] for name in ('after_wake', 'after_consolidation',
                                       *configs)}
  for g, passages in enumerate(groups):
    key = jax.random.fold_in(rng, g)
    params, model_state = wake(s, b, b.params, b.model_state, passages,
                               jax.random.fold_in(key, 0))
    predictions['after_wake'] += answers(s, passages, params, model_state,
                                         backbone=b)
    params, model_state, slots = consolidate(
        s, b, params, model_state, passages, jax.random.fold_in(key, 1))
    predictions['after_consolidation'] += answers(s, passages, params,
                                                  model_state, backbone=b)
    level = len(b.model.config.cms_levels) - 1
    for name, cfg in configs.items():
      tasks = edit_tasks(s, passages, with_items=False, backbone=b)
      out = dreaming.dream_unrewarded(
          b.model, cfg, params, model_state, tasks, jax.random.fold_in(key, 2),
          level=level, slots=slots, generator=generators[name], seed=seed,
          **s.ids)
      predictions[name] += answers(s, passages, out.params, model_state,
                                   backbone=b)
    if regime == 'single':
      log(f'{regime} passage {g + 1}/{len(groups)} done')
  scores = {name: grade(s, s.eval, p) for name, p in predictions.items()}
  stages = {k: {g: scores[k][g] for g in GRADERS if g in scores[k]}
            for k in ('after_wake', 'after_consolidation', 'sleep')
            if k in scores}
  out = {name: scores[name] for name in configs}
  if 'sleep_no_dreaming' in rows:
    out['sleep_no_dreaming'] = scores['after_consolidation']
  return out, stages


# -------------------------------------------------------------- one unit ---


def run_unit(s: Setup, group: str, regime: str, seed: int | None,
             generators, log, levels: qa.Backbone | None):
  """The rows of one unit: ({row: scores}, stages or None).

  `generators.get(name, cfg, seed, backbone=None)` gives a trained
  generator LoRA (`knowledge._Generators`: trained once per run, saved
  in the workdir); `levels` is the `sleep_levels` backbone."""
  b, cfg = s.backbone, s.config
  if group == 'base':
    return {'base': grade(s, s.eval, answers(s, s.eval, b.params))}, None
  if group == 'in_context':
    return {'in_context': grade(s, s.eval, answers(s, s.eval, b.params,
                                                   in_context=True))}, None
  rng = jax.random.key(seed)
  host = np.random.default_rng(seed)
  base_dream = dreaming.DreamingConfig.from_dict(cfg.dreaming.to_dict())
  seal_cfg = with_overrides(base_dream, cfg.seal.to_dict(), 'seal')
  if group == 'passage_finetune':
    texts = [[p.context] for p in s.eval]
    return {group: _lora_row(s, regime, texts, rng, host)}, None
  if group in ('implications_finetune', 'seal'):
    generator = (generators.get('seal', seal_cfg, seed) if group == 'seal'
                 else None)
    edits = self_edits(s, seal_cfg, generator, jax.random.fold_in(rng, 1))
    texts = [[p.context] + e for p, e in zip(s.eval, edits)]
    scores = _lora_row(s, regime, texts, jax.random.fold_in(rng, 2), host)
    scores['self_edit_example'] = edits[0][0]
    return {group: scores}, None
  if group == 'sleep':
    configs = _sleep_configs(s, cfg.rows)
    gens = {name: generators.get(name, c, seed)
            for name, c in configs.items()}
    return sleep_unit(s, regime, cfg.rows, gens, rng, seed, log)
  if group == 'sleep_levels':
    configs = _sleep_configs(s, ['sleep'])
    gens = {'sleep': generators.get('sleep_levels', configs['sleep'], seed,
                                    backbone=levels)}
    rows, stages = sleep_unit(s, regime, ['sleep'], gens, rng, seed, log,
                              backbone=levels)
    return {'sleep_levels': rows['sleep']}, stages
  raise ValueError(f'unknown row group {group!r}')
