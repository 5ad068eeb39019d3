r"""Speed of the LM train step (MFU) and of the cached sampler, in one run.

    python -m benchmarks.lm [--d_model=512 --batch=32 --seq_len=256 ...]

1. Peak: the FLOP/s of a large jitted matmul (in the compute dtype) on this
   machine, now.
2. Train step: a d_model=512 llama-style model, batch x seq_len tokens per
   step (8,192 by default); MFU = model FLOPs/s (6N + attention, see
   `TransformerConfig.flops_per_token`) / peak.
3. Sampling: tokens/s of the KV-cache sampler vs full-recompute decoding of
   the same model, greedy, 128 new tokens.

The last two lines are exactly
    MFU: <percent>%
    sampling speedup cached/recompute: <ratio>x
"""

from __future__ import annotations

import functools
import statistics
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from sleep_jax import sampling, sharding, training
from sleep_jax.models import Transformer, TransformerConfig

_D_MODEL = flags.DEFINE_integer('d_model', 512, 'Model width.')
_LAYERS = flags.DEFINE_integer('num_layers', 4, 'Transformer blocks.')
_VOCAB = flags.DEFINE_integer('vocab_size', 8192, 'Vocabulary size.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Train batch size.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Train sequence length.')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Compute dtype.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed train steps.')
_MATMUL = flags.DEFINE_integer(
    'matmul_size', 0, 'Peak matmul size (0: 2048 on CPUs, 8192 on '
    'accelerators).')
_SAMPLE_BATCH = flags.DEFINE_integer('sample_batch', 8, 'Sampling batch.')
_PROMPT = flags.DEFINE_integer('prompt_len', 64, 'Sampling prompt length.')
_NEW = flags.DEFINE_integer('new_tokens', 128, 'Tokens to sample.')


def train_step_flops(config: TransformerConfig, batch: int, seq_len: int,
                     steps: int) -> tuple[float, float]:
  """(achieved model FLOP/s, seconds per step) of the sharded train step."""
  model = Transformer(config)
  opt = dict(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1, b1=0.9,
             b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)
  tx, schedule = training.make_optimizer(opt, 1000)
  mesh = sharding.make_mesh({'data': -1})
  rules = sharding.DEFAULT_RULES
  state, shardings = sharding.init_sharded(
      functools.partial(training.create_train_state, model, tx), mesh, rules,
      jax.random.key(0), jnp.ones((1, seq_len), jnp.int32))
  step = training.compile_train_step(model, tx, schedule, shardings, mesh, rules)
  rng = np.random.default_rng(0)
  toks = rng.integers(0, config.vocab_size, (batch, seq_len + 1)).astype(np.int32)
  batch_arrays = {'inputs': toks[:, :-1], 'targets': toks[:, 1:],
                  'mask': np.ones((batch, seq_len), np.int32)}
  state, metrics = step(state, batch_arrays)  # compile
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch_arrays)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  flops = config.flops_per_token(seq_len) * batch * seq_len
  return flops / seconds, seconds


def sampling_tokens_per_second(config: TransformerConfig, batch: int,
                               prompt_len: int, new_tokens: int):
  model = Transformer(config)
  params = nn.meta.unbox(model.init(jax.random.key(0),
                                    jnp.ones((1, 4), jnp.int32)))['params']
  prompts = jax.random.randint(jax.random.key(1), (batch, prompt_len), 1,
                               config.vocab_size)
  lengths = jnp.full((batch,), prompt_len, jnp.int32)
  rates = {}
  for use_cache in (True, False):
    run = lambda: sampling.sample(model, params, prompts, lengths,
                                  max_new_tokens=new_tokens,
                                  rng=jax.random.key(0), use_cache=use_cache)
    seconds = timing.best_seconds(lambda: run().tokens, repeats=2)
    rates[use_cache] = batch * new_tokens / seconds
  return rates[True], rates[False]


def main(argv):
  del argv
  sharding.maybe_initialize_distributed()
  print(timing.device_line())
  config = TransformerConfig(
      vocab_size=_VOCAB.value, d_model=_D_MODEL.value, num_layers=_LAYERS.value,
      num_heads=_D_MODEL.value // 64, num_kv_heads=_D_MODEL.value // 64,
      d_ff=3 * _D_MODEL.value, dtype=_DTYPE.value, max_len=4096)
  # The peak is measured in the compute dtype, so bfloat16 runs are not
  # compared against a float32 peak.
  size = timing.peak_matmul_size(_MATMUL.value)
  peak = timing.peak_matmul_flops(size, config.compute_dtype)
  print(f'peak matmul ({size}^3 {_DTYPE.value}): {peak / 1e9:.1f} GFLOP/s')
  achieved, seconds = train_step_flops(config, _BATCH.value, _SEQ.value,
                                       _STEPS.value)
  tokens = _BATCH.value * _SEQ.value
  print(f'train step: d_model={config.d_model} layers={config.num_layers} '
        f'params={config.num_params():,} tokens/step={tokens} '
        f'{seconds * 1e3:.0f} ms/step {tokens / seconds:,.0f} tokens/s '
        f'{achieved / 1e9:.1f} GFLOP/s')
  cached, recompute = sampling_tokens_per_second(
      config, _SAMPLE_BATCH.value, _PROMPT.value, _NEW.value)
  print(f'sampling (batch {_SAMPLE_BATCH.value}, prompt {_PROMPT.value}, '
        f'{_NEW.value} new tokens): cached {cached:,.0f} tokens/s, recompute '
        f'{recompute:,.0f} tokens/s')
  print(f'MFU: {100 * achieved / peak:.1f}%')
  print(f'sampling speedup cached/recompute: {cached / recompute:.1f}x')


if __name__ == '__main__':
  app.run(main)
