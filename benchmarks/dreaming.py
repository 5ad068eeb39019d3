r"""Isolated LoRA evaluation of N dreams: one vmapped program vs one at a time.

    python -m benchmarks.dreaming [--n=16,64 --repeats=3]

Each dream gets a fresh LoRA, `eval_steps` Adam SFT steps on that dream
alone, and tau (closed-book recall of its context's items) before and after
(sleep_jax.dream_sft.isolated_copy), on the dreaming study's model shape
(experiments/configs/dreaming.py: d_model 96, 3 layers, CMS). Two ways, same
inputs, same keys:
  * vmapped:    `dream_sft.evaluate`, all N copies in one jitted program;
  * sequential: the same per-copy function jitted once and called N times in
                a Python loop, one copy after another (SEAL's structure).
Both are compiled before timing (compile time is not counted) and checked to
give the same rewards. Reports the median of `repeats` runs; the last line is
exactly `dreaming speedup vmapped/sequential at N=<n>: <ratio>x` for the
largest N.
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import dreaming as dreaming_config
from sleep_jax import dream_sft
from sleep_jax import dreaming
from sleep_jax.models import Transformer, TransformerConfig

_N = flags.DEFINE_list('n', ['16', '64'], 'Dreams (isolated copies) per call.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats (median).')
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


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv):
  del argv
  print(f'device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform})',
        flush=True)
  config = dreaming_config.get_config()
  model = Transformer(TransformerConfig.from_dict(config.model, key='model'))
  variables = dict(nn.meta.unbox(model.init(jax.random.key(0),
                                            jnp.zeros((1, 8), jnp.int32))))
  params = variables.pop('params')
  cfg = dreaming.DreamingConfig.from_dict(config.dreaming.to_dict())
  one = jax.jit(lambda key, d, it: dream_sft.isolated_copy(
      model, cfg, params, variables, key, d, it))
  print(f'per copy: LoRA rank {cfg.lora_rank} on {len(cfg.lora.targets)} '
        f'kernel patterns, {cfg.eval_steps} SFT steps on a '
        f'{_DREAM_TOKENS.value}-token dream, tau on 3 items', flush=True)
  line = ''
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

    def vmapped():
      return dream_sft.evaluate(model, cfg, params, variables, rng, data,
                               items).reward

    def sequential():
      return [one(*args)[1] for args in per_copy]

    together = np.asarray(vmapped())                     # compile + check
    apart = np.asarray(sequential())
    before = np.asarray(dream_sft.evaluate(model, cfg, params, variables, rng,
                                          data, items).tau_before)
    if not np.array_equal(together, (apart > before).astype(np.float32)):
      raise RuntimeError('vmapped and sequential rewards differ')
    t_vmap = _median_seconds(vmapped, _REPEATS.value)
    t_seq = _median_seconds(sequential, _REPEATS.value)
    print(f'N={n:3d}: vmapped {t_vmap * 1e3:8.1f} ms, sequential '
          f'{t_seq * 1e3:8.1f} ms ({n / t_vmap:7.1f} vs {n / t_seq:6.1f} '
          f'dreams/s)', flush=True)
    line = f'dreaming speedup vmapped/sequential at N={n}: {t_seq / t_vmap:.2f}x'
  print(line, flush=True)


if __name__ == '__main__':
  app.run(main)
