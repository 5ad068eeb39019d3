r"""Isolated LoRA evaluation of N dreams: one vmapped program vs one at a time.

    python -m benchmarks.dreaming [--n=16,64 --repeats=3]
    python -m benchmarks.dreaming --config=experiments/configs/dreaming.py:smoke

Each dream gets a fresh LoRA, `eval_steps` Adam SFT steps on that dream
alone, and tau (closed-book recall of its context's items) before and after
(sleep_jax.dream_sft.isolated_copy), with the model and dreaming settings of
--config (default: the dreaming study's, d_model 96, 3 layers, CMS). Two
ways, same inputs, same keys:
  * vmapped:    `dream_sft.evaluate`, all N copies in one jitted program;
  * sequential: the same per-copy function jitted once and called N times in
                a Python loop, one copy after another (SEAL's structure).
Both are compiled before timing (compile time is not counted) and checked to
give the same rewards; times are the fastest of `repeats` runs. GFLOP/s is
N times one copy's FLOPs (XLA's count of tau before and after, and of one
SFT step, `eval_steps` times) over each way's time, beside the machine's
matmul peak measured in the same run. The last line is exactly
`dreaming speedup vmapped/sequential at N=<n>: <ratio>x` for the largest N.
"""

from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import timing
from sleep_jax import dream_sft
from sleep_jax import dreaming
from sleep_jax.models import Transformer, TransformerConfig
from sleep_jax.models import lora

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'experiments/configs/dreaming.py',
    'Dreaming config file, optionally with ":variant".', lock_config=True)
_N = flags.DEFINE_list('n', ['16', '64'], 'Dreams (isolated copies) per call.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats (fastest).')
_MATMUL = flags.DEFINE_integer(
    'matmul_size', 0, 'Peak matmul size (0: 2048 on CPUs, 8192 on '
    'accelerators).')
_DREAM_TOKENS = flags.DEFINE_integer('dream_tokens', 28, 'Tokens per dream.')


def _inputs(n: int, vocab: int, width: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  dreams = rng.integers(3, vocab, (n, width)).astype(np.int32)
  lengths = rng.integers(width // 2, width + 1, n).astype(np.int32)
  tokens, masks = dream_sft.dream_rows(dreams, lengths, bos_id=1, pad_id=0)
  q, length = 3, 24
  items = {'inputs': rng.integers(3, vocab, (n, q, length)).astype(np.int32),
           'targets': rng.integers(3, vocab, (n, q, length)).astype(np.int32),
           'answer_mask': np.zeros((n, q, length), np.float32)}
  items['answer_mask'][:, :, 12:15] = 1.0
  return tokens, masks, items


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def _flops(fn, *args) -> float:
  """FLOPs of one call of fn by XLA's cost analysis (2 per multiply-add). A
  loop body counts once, whatever its trip count."""
  cost = _compile(fn, *args).cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)['flops'])


def _copy_flops(model, cfg, params, variables, key, data, items) -> float:
  """FLOPs of one isolated copy: tau before (base model) and after (with the
  LoRA) plus `eval_steps` SFT steps, each counted by XLA apart (the copy's
  own program is a scan over its steps, and XLA would count one)."""
  adapter = lora.init(params, cfg.lora, key)
  carry = (adapter, optax.adam(data.learning_rate).init(adapter))
  tau_before = _flops(
      lambda p, v, it: dream_sft.tau(model, p, v, it, cfg.tau),
      params, variables, items)
  tau_after = _flops(
      lambda p, v, a, it: dream_sft.tau(model, p, v, it, cfg.tau, a, cfg),
      params, variables, adapter, items)
  step = _flops(
      lambda p, v, c, b: dream_sft.copy_sft_step(model, cfg, p, v,
                                                 data.learning_rate, c, b),
      params, variables, carry,
      (data.tokens[0], data.mask[0], data.active[0]))
  return tau_before + tau_after + data.tokens.shape[0] * step


def main(argv):
  del argv
  print(timing.device_line(), flush=True)
  size = timing.peak_matmul_size(_MATMUL.value)
  peak = timing.peak_matmul_flops(size, jnp.float32)
  print(f'peak matmul ({size}^3 float32): {peak / 1e9:.1f} GFLOP/s',
        flush=True)
  config = _CONFIG.value
  model = Transformer(TransformerConfig.from_dict(config.model, key='model'))
  variables = dict(nn.meta.unbox(model.init(jax.random.key(0),
                                            jnp.zeros((1, 8), jnp.int32))))
  params = variables.pop('params')
  cfg = dreaming.DreamingConfig.from_dict(config.dreaming.to_dict())
  print(f'per copy: LoRA rank {cfg.lora_rank} on {len(cfg.lora.targets)} '
        f'kernel patterns, {cfg.eval_steps} SFT steps on a '
        f'{_DREAM_TOKENS.value}-token dream, tau on 3 items', flush=True)
  line, one, flops_one = '', None, 0.0
  for n in sorted(int(x) for x in _N.value):
    tokens, masks, items = _inputs(n, model.config.vocab_size,
                                   _DREAM_TOKENS.value)
    rng = jax.random.key(1)
    keys = dream_sft.copy_keys(rng, n)
    data = dream_sft.dream_copies(tokens, masks, cfg)
    # Each copy's inputs are sliced before timing, as separate runs would
    # have them ready.
    per_copy = [(keys[i], jax.tree.map(lambda x, i=i: x[i], data),
                 {k: jnp.asarray(v[i]) for k, v in items.items()})
                for i in range(n)]
    if one is None:  # one shape for every N: compiled once
      one = _compile(
          lambda p, v, key, d, it: dream_sft.isolated_copy(
              model, cfg, p, v, key, d, it), params, variables, *per_copy[0])
      flops_one = _copy_flops(model, cfg, params, variables, *per_copy[0])
    together = _compile(
        lambda p, v, d, it: dream_sft.evaluate(model, cfg, p, v, rng, d, it),
        params, variables, data, items)
    vmapped = lambda: together(params, variables, data, items).reward
    sequential = lambda: [one(params, variables, *args)[1]
                          for args in per_copy]

    result = together(params, variables, data, items)
    apart = np.asarray(sequential())
    if not np.array_equal(np.asarray(result.reward),
                          (apart > np.asarray(result.tau_before))
                          .astype(np.float32)):
      raise RuntimeError('vmapped and sequential rewards differ')
    flops = n * flops_one  # the same arithmetic either way
    t_vmap = timing.best_seconds(vmapped, _REPEATS.value)
    t_seq = timing.best_seconds(sequential, _REPEATS.value)
    print(f'N={n:3d}: vmapped {t_vmap * 1e3:8.1f} ms '
          f'({flops / t_vmap / 1e9:5.1f} GFLOP/s), sequential '
          f'{t_seq * 1e3:8.1f} ms ({flops / t_seq / 1e9:5.1f} GFLOP/s); '
          f'{n / t_vmap:7.1f} vs {n / t_seq:6.1f} dreams/s', flush=True)
    line = (f'dreaming speedup vmapped/sequential at N={n}: '
            f'{t_seq / t_vmap:.2f}x')
  print(line, flush=True)


if __name__ == '__main__':
  app.run(main)
