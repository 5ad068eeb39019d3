"""What a knowledge-study config will cost, before it runs.

`python -m experiments.knowledge --config=...:paper --plan` answers three
questions without running the study:

* **Does it fit?** The three largest consumers of device memory, from
  shapes: the LoRA copies trained side by side (params, gradient and two
  Adam moments per copy, `chunk_size` copies at a time), the KV cache of
  the largest sampling batch, and the activations of the largest training
  step (`resources.training_bytes`); and a `jax.eval_shape` of the LoRA
  copy step at the config's sizes (traced, nothing allocated).
* **How much work?** A ledger per row group: tokens through a forward and
  backward pass, forward-only tokens, sampled tokens and sequential steps,
  counted from the config the way `knowledge_rows.py` runs it (formulas
  below; an estimate: prompts are counted at their padded width, questions
  at `data.max_questions` per passage).
* **How long?** The ledger times per-token costs measured here, on this
  machine, at the config's shapes (one LoRA training step, one batch of
  greedy answers); and, for accelerators, a floor from FLOPs alone (6 x
  params per trained token, 2 x per forward or sampled token) at the
  device's peak. A model this small does not reach peak on an accelerator
  (an H100 ran the dreaming study slower than 2 CPU cores: launch-bound),
  so that floor is a bound, not a forecast; the sequential step count says
  how many launches the run makes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax import dream_sft
from sleep_jax import dreaming
from sleep_jax import metrics as metrics_lib
from sleep_jax import resources
from sleep_jax import sampling
from sleep_jax import seeding
from sleep_jax.models import lora
from sleep_jax.stage_config import with_overrides
from sleep_jax.studies import knowledge
from sleep_jax.studies import knowledge_qa as qa
from sleep_jax.studies import knowledge_rows
from sleep_jax.studies import knowledge_setup

_GIB = 2.0**30
# Dense bf16 peak FLOP/s (vendor datasheets) and memory per device.
ACCELERATORS = {'TPU v5e-8': (8 * 197e12, 16 * _GIB, 8),
                'H100 SXM': (989e12, 80 * _GIB, 1)}


@dataclasses.dataclass
class Work:
  """Tokens through the model, by kind, and sequential device steps."""
  train: float = 0.0     # forward + backward
  forward: float = 0.0   # forward only (teachers, tau, prefill)
  sampled: float = 0.0   # one cached decode step per row and token
  steps: float = 0.0     # sequential compiled steps

  def __add__(self, other: 'Work') -> 'Work':
    return Work(*(a + b for a, b in zip(dataclasses.astuple(self),
                                        dataclasses.astuple(other))))

  def __mul__(self, k: float) -> 'Work':
    return Work(*(k * a for a in dataclasses.astuple(self)))


def _sample(rows: float, prompt: int, new: int) -> Work:
  return Work(forward=rows * prompt, sampled=rows * new, steps=new)


def _sft(copies: float, steps: int, batch: int, width: int) -> Work:
  """`copies` LoRAs side by side (one program), `steps` steps each."""
  return Work(train=copies * steps * batch * width, steps=steps)


def _answers(c, passages: float, in_context: bool = False) -> Work:
  """Greedy answers to `passages`' questions in batches of
  `answer.batch_size` rows (a last partial batch is padded: one shape)."""
  batches = math.ceil(passages * int(c.data.max_questions) /
                      int(c.answer.batch_size))
  width = int(c.widths.in_context if in_context else c.widths.prompt)
  new = int(c.answer.max_new_tokens)
  return _sample(batches * int(c.answer.batch_size), width, new) + Work(
      steps=new * (batches - 1))


def _dream_width(d) -> int:
  return d.max_new_tokens + 1   # BOS + a dream


def _select(c, d, contexts: float) -> Work:
  """Gradient selection: one gradient per dream and one per context."""
  if d.selection != 'gradient':
    return Work()
  return Work(train=contexts * (d.num_dreams * _dream_width(d) +
                                int(c.widths.passage)), steps=1)


def _rest_em(c, d) -> Work:
  """ReST-EM on the training passages: rounds 0..R of generate, select,
  isolated copies (eval_steps each, tau before and after), M-step."""
  t = int(c.data.train_passages)
  kept = t * (d.keep_top + d.keep_random)
  tau = 2 * kept * int(c.data.max_questions) * int(c.widths.item)
  work = Work()
  for r in range(d.rounds + 1):
    work += _sample(t * d.num_dreams, int(c.widths.self_edit_prompt),
                    d.max_new_tokens)
    work += _select(c, d, t)
    work += _sft(kept, d.eval_steps, 1, _dream_width(d)) + Work(forward=tau)
    if r < d.rounds:
      work += _sft(1, d.rest_steps, d.rest_batch_size,
                   int(c.widths.self_edit_prompt) + d.max_new_tokens)
  return work


def _consolidate(c, levels: int) -> Work:
  """Knowledge Seeding, `levels` level pairs: per step, rollouts (GKD:
  one per prompt; LTI: group_size per prompt), the teacher's forward pass
  and the student's step, on prompts up to a passage wide."""
  s = seeding.SeedingConfig.from_dict(c.sleep.to_dict())
  rows = s.batch_size * ((s.alpha > 0) + (s.alpha < 1) * s.group_size)
  width = int(c.widths.passage) + s.max_new_tokens
  one = Work(train=rows * width, forward=rows * width,
             sampled=rows * s.max_new_tokens, steps=1 + s.max_new_tokens)
  return one * (s.num_steps * levels)


def _sleep_group(c, configs, passages: float, levels: int) -> Work:
  """Wake, answers, consolidation, answers, then per dreaming variant:
  generate, select, rehearse, answers."""
  work = _sft(1, int(c.wake.steps) * int(passages), 1, int(c.widths.passage))
  work += _answers(c, passages) * 2 + _consolidate(c, levels)
  for d in configs.values():
    work += _sample(passages * d.num_dreams, int(c.widths.self_edit_prompt),
                    d.max_new_tokens)
    work += _select(c, d, passages)
    work += _sft(1, d.rehearse_steps, d.rehearse_batch_size, _dream_width(d))
    work += _answers(c, passages)
  return work


def ledger(config) -> dict[str, Work]:
  """{unit name: Work} for every unit `knowledge.run` would run; each
  generator's ReST-EM is charged to the first unit that trains it."""
  c, out, trained = config, {}, set()
  p = int(c.data.eval_passages)
  base = dreaming.DreamingConfig.from_dict(c.dreaming.to_dict())
  seal = with_overrides(base, c.seal.to_dict(), 'seal')
  sleeps = {name: dataclasses.replace(base, **over)
            for name, over in knowledge_setup.SLEEP_VARIANTS.items()
            if name in c.rows}
  ft = c.finetune

  def generator(name, d, seed) -> Work:
    if (name, seed) in trained:
      return Work()
    trained.add((name, seed))
    return _rest_em(c, d)

  for group, regime, seed in knowledge._units(c):  # pylint: disable=protected-access
    if group in ('base', 'in_context'):
      work = _answers(c, p, in_context=group == 'in_context')
    else:
      single = regime == 'single'
      groups = p if single else 1
      if group in ('passage_finetune', 'implications_finetune', 'seal'):
        width, steps = int(c.widths.passage), int(
            ft.steps if single else ft.cpt_steps)
        # single: each passage's copy answers its own questions.
        work = _sft(groups, steps, int(ft.batch_size), width) + _answers(
            c, p / groups) * groups
        if group != 'passage_finetune':
          work += _sample(p * seal.num_dreams, int(c.widths.self_edit_prompt),
                          seal.max_new_tokens)
        if group == 'seal':
          work += generator('seal', seal, seed)
      elif group == 'sleep':
        work = _sleep_group(c, sleeps, p / groups, 1) * groups
        for name, d in sleeps.items():
          work += generator(name, d, seed)
      else:  # sleep_levels
        one = {'sleep': base}
        work = _sleep_group(c, one, p / groups,
                            len(c.levels_fast_levels)) * groups
        work += generator('sleep_levels', base, seed)
    out[knowledge.unit_name(group, regime, seed)] = work
  return out


# ---------------------------------------------------------------- memory ---


def _kv_bytes(model_config, rows: int, width: int) -> float:
  head_dim = (model_config.head_dim or
              model_config.d_model // model_config.num_heads)
  return (4.0 * 2 * model_config.num_layers * rows * width *
          model_config.num_kv_heads * head_dim)


def _copy_bytes(params, cfg: lora.LoraConfig, copies: int) -> tuple[float, int]:
  """(bytes, LoRA params per copy) of `copies` LoRAs with their gradient
  and two Adam moments."""
  shapes = jax.eval_shape(lambda: lora.init(params, cfg, jax.random.key(0)))
  n = int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))
  return 4.0 * 4 * n * copies, n


def memory(config, backbone: qa.Backbone) -> dict:
  """The largest consumers of device memory, in bytes."""
  c, m = config, backbone.model
  ft = c.finetune
  base = dreaming.DreamingConfig.from_dict(c.dreaming.to_dict())
  p, t = int(c.data.eval_passages), int(c.data.train_passages)
  lanes = int(ft.chunk_size) or p
  copies, per_copy = _copy_bytes(
      backbone.params, knowledge_rows.lora_sft(c.finetune).lora, lanes)
  rest_lanes = base.chunk_size or t * (base.keep_top + base.keep_random)
  rest_copies, _ = _copy_bytes(backbone.params, base.lora, rest_lanes)
  step, n_params = resources.training_bytes(m, int(ft.batch_size),
                                            int(c.widths.passage))
  # training_bytes counts 8 float32 copies of the weights; a LoRA copy
  # shares one frozen set: what is left is one copy's activations.
  activations = lanes * (step - 4.0 * resources.TRAINING_COPIES * n_params)
  weights = 4.0 * n_params
  s = seeding.SeedingConfig.from_dict(c.sleep.to_dict())
  ks_rows = s.batch_size * ((s.alpha > 0) + (s.alpha < 1) * s.group_size)
  ks, _ = resources.training_bytes(
      m, ks_rows, int(c.widths.passage) + s.max_new_tokens)
  dream_rows = p * base.num_dreams
  kv = _kv_bytes(m.config, dream_rows, int(c.widths.self_edit_prompt) +
                 base.max_new_tokens)
  return {
      'params': n_params,
      'lora_params_per_copy': per_copy,
      'finetune_copies_in_flight': lanes,
      'finetune_copies_bytes': copies + activations,
      'rest_em_copies_in_flight': rest_lanes,
      'rest_em_copies_bytes': rest_copies,
      'knowledge_seeding_step_bytes': ks,
      'largest_sample_batch': dream_rows,
      'largest_sample_kv_bytes': kv,
      'peak_bytes': max(copies + activations + weights,
                        rest_copies + weights, ks, kv + weights),
  }


def trace_copy_step(config, backbone: qa.Backbone) -> dict:
  """`jax.eval_shape` of `chunk_size` LoRA copies' training at the config's
  sizes: the program traces at that size (nothing is allocated)."""
  c, b = config, backbone
  ft = c.finetune
  lanes = int(ft.chunk_size) or int(c.data.eval_passages)
  width = int(c.widths.passage)
  steps = int(ft.steps)
  data = dream_sft.CopyData(
      jax.ShapeDtypeStruct((lanes, steps, int(ft.batch_size), width + 1),
                           jnp.int32),
      jax.ShapeDtypeStruct((lanes, steps, int(ft.batch_size), width + 1),
                           jnp.float32),
      jax.ShapeDtypeStruct((lanes,), jnp.float32),
      jax.ShapeDtypeStruct((lanes, steps), jnp.bool_))
  cfg = knowledge_rows.lora_sft(c.finetune)
  out = jax.eval_shape(
      lambda d: dream_sft.fit_copies(b.model, cfg, b.params, b.model_state,
                                     jax.random.key(0), d), data)
  leaves = jax.tree.leaves(out)
  return {'copies': lanes, 'adapter_leaves': len(leaves),
          'adapter_params': int(sum(np.prod(x.shape) for x in leaves))}


# ------------------------------------------------------------------ time ---


def measure(config, backbone: qa.Backbone, repeats: int = 2) -> dict:
  """Seconds per trained token (one LoRA training step of batch
  `finetune.batch_size` x `widths.passage`, 8 rows when that is 1, so the
  step is not dominated by overhead) and per sampled token (cached greedy
  decoding of a batch of answers, prefill excluded), measured here after
  compiling."""
  c, b = config, backbone
  width = int(c.widths.passage)
  batch = max(8, int(c.finetune.batch_size))
  cfg = knowledge_rows.lora_sft(c.finetune)
  tokens = np.ones((1, repeats, batch, width + 1), np.int32)
  data = dream_sft.CopyData(tokens, np.ones_like(tokens, np.float32),
                            np.full((1,), 1e-4, np.float32),
                            np.ones((1, repeats), bool))
  fit = functools.partial(dream_sft.fit_copies, b.model, cfg, b.params,
                          b.model_state, jax.random.key(0))
  jax.block_until_ready(fit(data))   # compile
  t0 = time.perf_counter()
  jax.block_until_ready(fit(data))
  train = (time.perf_counter() - t0) / (repeats * batch * width)

  rows = int(c.answer.batch_size)
  new = int(c.answer.max_new_tokens)
  prompt = int(c.widths.prompt)
  tok = b.tokenizer
  prompts = np.full((rows, prompt), tok.pad_id, np.int32)
  prompts[:, :prompt // 2] = tok.bos_id if tok.bos_id is not None else 1
  lengths = np.full((rows,), prompt // 2, np.int32)
  def sample_seconds(n: int) -> float:
    sample = functools.partial(
        sampling.sample, b.model, b.params, prompts, lengths,
        max_new_tokens=n, rng=jax.random.key(0), temperature=0.0,
        eos_id=None, pad_id=tok.pad_id, model_state=b.model_state)
    jax.block_until_ready(sample().tokens)   # compile
    t0 = time.perf_counter()
    jax.block_until_ready(sample().tokens)
    return time.perf_counter() - t0

  # The prefill is counted as forward tokens: a token's own cost is the
  # difference between n and 2n new tokens.
  sampled = max(sample_seconds(2 * new) - sample_seconds(new), 1e-9) / (
      rows * new)
  return {'device': jax.devices()[0].device_kind,
          'train_s_per_token': train, 'train_shape': [batch, width],
          'sampled_s_per_token': sampled, 'sample_shape': [rows, prompt, new]}


def seconds(work: Work, costs: dict) -> float:
  """This machine: trained tokens at the measured cost, forward-only tokens
  at a third of it (2 of 6 FLOPs per parameter), sampled tokens at the
  measured sampling cost."""
  train = costs['train_s_per_token']
  return (work.train * train + work.forward * train / 3 +
          work.sampled * costs['sampled_s_per_token'])


def flops(work: Work, params: int) -> float:
  return 6.0 * params * work.train + 2.0 * params * (work.forward +
                                                     work.sampled)


def plan(config, backbone: qa.Backbone, *, measure_costs: bool = True) -> dict:
  """The whole answer, as a JSON-ready dict."""
  knowledge_setup.validate_config(config)
  mem = memory(config, backbone)
  units = ledger(config)
  total = functools.reduce(lambda a, b: a + b, units.values(), Work())
  out = {'memory': mem, 'eval_shape': trace_copy_step(config, backbone),
         'units': {k: dataclasses.asdict(v) for k, v in units.items()},
         'total': dataclasses.asdict(total),
         'flops': flops(total, mem['params'])}
  fits = {}
  for name, (peak, per_device, n) in ACCELERATORS.items():
    fits[name] = {'memory_per_device_gib': per_device / _GIB,
                  'fits_one_device': mem['peak_bytes'] < 0.9 * per_device,
                  'flops_floor_s': out['flops'] / peak, 'devices': n}
  out['accelerators'] = fits
  if measure_costs:
    costs = measure(config, backbone)
    out['measured'] = costs
    out['this_machine_s'] = {k: seconds(v, costs) for k, v in units.items()}
    out['this_machine_total_s'] = sum(out['this_machine_s'].values())
  return out


def _duration(s: float) -> str:
  if s >= 3600:
    return f'{s / 3600:,.1f} h'
  return f'{s / 60:,.1f} min' if s >= 60 else f'{s:.2g} s'


def _gib(x: float) -> str:
  return f'{x / _GIB:,.2f} GiB'


def render(p: dict) -> str:
  """The plan as Markdown."""
  m = p['memory']
  lines = [
      '# Knowledge study: plan', '',
      f"Backbone: {m['params']:,} parameters; a LoRA copy "
      f"{m['lora_params_per_copy']:,}.", '',
      '| memory | in flight | bytes |', '|---|---|---|',
      f"| LoRA fine-tuning copies (params, grad, Adam; activations) | "
      f"{m['finetune_copies_in_flight']} | {_gib(m['finetune_copies_bytes'])} |",
      f"| ReST-EM isolated copies | {m['rest_em_copies_in_flight']} | "
      f"{_gib(m['rest_em_copies_bytes'])} |",
      f"| Knowledge Seeding step | 1 | "
      f"{_gib(m['knowledge_seeding_step_bytes'])} |",
      f"| KV cache, largest sampling batch | {m['largest_sample_batch']} rows"
      f" | {_gib(m['largest_sample_kv_bytes'])} |",
      f"| **peak (largest + weights)** | | **{_gib(m['peak_bytes'])}** |", '',
      f"eval_shape of the LoRA copy step: {p['eval_shape']['copies']} copies, "
      f"{p['eval_shape']['adapter_params']:,} adapter params out.", '',
      '| unit | trained tokens | forward tokens | sampled tokens | steps |'
      + (' est. here |' if 'this_machine_s' in p else ''),
      '|---|---|---|---|---|' + ('---|' if 'this_machine_s' in p else '')]
  for name, w in p['units'].items():
    row = (f"| {name} | {w['train']:,.0f} | {w['forward']:,.0f} | "
           f"{w['sampled']:,.0f} | {w['steps']:,.0f} |")
    if 'this_machine_s' in p:
      row += f" {_duration(p['this_machine_s'][name])} |"
    lines.append(row)
  t = p['total']
  lines += ['', f"Total: {t['train']:,.0f} trained, {t['forward']:,.0f} "
            f"forward, {t['sampled']:,.0f} sampled tokens; {t['steps']:,.0f} "
            f"sequential steps; {p['flops']:.3g} FLOPs.", '']
  if 'measured' in p:
    c = p['measured']
    lines += [f"Measured on {c['device']}: {c['train_s_per_token'] * 1e3:.3f} "
              f"ms per trained token (batch x width {c['train_shape']}), "
              f"{c['sampled_s_per_token'] * 1e3:.3f} ms per sampled token "
              f"(rows, prompt, new {c['sample_shape']}). Estimated total "
              f"here: {_duration(p['this_machine_total_s'])}.", '']
  lines += ['| accelerator | fits one device | FLOP floor at peak |',
            '|---|---|---|']
  for name, a in p['accelerators'].items():
    lines.append(f"| {name} | {'yes' if a['fits_one_device'] else 'no'} "
                 f"({a['memory_per_device_gib']:.0f} GiB) | "
                 f"{_duration(a['flops_floor_s'])} |")
  lines += ['', 'The FLOP floor is a bound, not a forecast: a model this '
            'small is launch-bound on an accelerator (see the step count).']
  return '\n'.join(lines) + '\n'


def write(config, workdir: str) -> str:
  """Loads the backbone, writes workdir/plan.json and plan.md; returns the
  Markdown."""
  knowledge_setup.validate_config(config)
  backbone = qa.load_backbone(config.backbone, config.fast_levels,
                              config.slow_level)
  p = plan(config, backbone)
  os.makedirs(workdir, exist_ok=True)
  metrics_lib.write_json(os.path.join(workdir, 'plan.json'), p)
  text = render(p)
  with open(os.path.join(workdir, 'plan.md'), 'w') as f:
    f.write(text)
  return text
