r"""sleep_jax against transformers + PyTorch on the same model, in one run.

    pip install -e '.[peers]'
    python -m sleep_jax.assets fetch smollm2-135m
    python -m benchmarks.peers [--repeats=3 --torch_threads=0]

Both sides load SmolLM2-135M-Instruct from the same GGUF file (our
`load_gguf`; transformers' own GGUF loader), in float32, and do the same
work, which the benchmark checks before it times anything:

* greedy sampling of `--new_tokens` tokens after a `--prompt_len`-token
  prompt, at batch 1 and 8, with the KV cache (transformers' `generate`);
  the greedy tokens must be identical;
* one AdamW step (global-norm clipping 1.0, weight decay on matrices) on a
  `--train_batch` x `--train_len` batch; the first step's loss must agree
  to 1e-4.

Times are the fastest of `--repeats` after one untimed call; JAX's first
call (compiling) is reported apart. PyTorch gets whichever of 1 or 2
intra-op threads is faster for each measure (`--torch_threads=0`), or the
count given. The last line is exactly
    peer speed sleep_jax/transformers: sample_b1 <x>x, sample_b8 <y>x, train <z>x
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from sleep_jax import assets, sampling, sharding, training
from sleep_jax.checkpoints import gguf
from sleep_jax.models import Transformer

_PROMPT = flags.DEFINE_integer('prompt_len', 64, 'Prompt tokens.')
_NEW = flags.DEFINE_integer('new_tokens', 128, 'Greedy tokens to sample.')
_SAMPLE_BATCHES = flags.DEFINE_list('sample_batches', ['1', '8'],
                                    'Sampling batch sizes.')
_TRAIN_BATCH = flags.DEFINE_integer('train_batch', 8, 'Train batch size.')
_TRAIN_LEN = flags.DEFINE_integer('train_len', 256, 'Train sequence length.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls per measure.')
_TORCH_THREADS = flags.DEFINE_integer(
    'torch_threads', 0, "PyTorch's intra-op threads (0: the faster of 1 and "
    '2, per measure).')
_GGUF = flags.DEFINE_string('gguf', None, 'GGUF file (default: the '
                            'smollm2-135m asset).')

LEARNING_RATE = 1e-4
OPTIMIZER = dict(learning_rate=LEARNING_RATE, warmup_steps=0, min_lr_ratio=1.0,
                 b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)


def _best_seconds(fn, repeats: int) -> float:
  """The fastest of `repeats` timed calls, after one untimed call."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


class Ours:
  """sleep_jax: the model, the cached sampler and the compiled train step."""

  def __init__(self, path: str):
    self.config, self.params, _ = gguf.load_gguf(path)
    self.model = Transformer(self.config)

  def sample(self, prompt_BxP: np.ndarray, new_tokens: int) -> np.ndarray:
    batch, length = prompt_BxP.shape
    out = sampling.sample(self.model, self.params, prompt_BxP,
                          np.full((batch,), length, np.int32),
                          max_new_tokens=new_tokens, rng=jax.random.key(0))
    return np.asarray(out.tokens)

  def train_step(self):
    """A function running one step on a fixed batch; returns the loss."""
    tx, schedule = training.make_optimizer(OPTIMIZER, total_steps=1000)
    mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1},
                              jax.devices()[:1])
    replicated = sharding.replicated(mesh)
    state = training.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=jax.tree.map(jnp.array, self.params),
        opt_state=tx.init(self.params), model_state={})
    shardings = jax.tree.map(lambda _: replicated, state)
    step = training.compile_train_step(self.model, tx, schedule, shardings,
                                       mesh, sharding.DEFAULT_RULES)
    holder = {'state': state}

    def run(batch):
      holder['state'], metrics = step(holder['state'], batch)
      return float(metrics['loss'])
    return run


class Theirs:
  """transformers + PyTorch: `generate` and a hand-written AdamW step."""

  def __init__(self, path: str):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    self.torch = torch
    directory, name = os.path.split(path)
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32)
    # No end-of-sequence stop on either side: both make every token.
    self.model.generation_config.eos_token_id = None
    self.generation = transformers.GenerationConfig(
        do_sample=False, eos_token_id=None, pad_token_id=0)

  def threads(self, n: int) -> None:
    self.torch.set_num_threads(n)

  def sample(self, prompt_BxP: np.ndarray, new_tokens: int) -> np.ndarray:
    torch = self.torch
    self.model.eval()
    prompt = torch.from_numpy(prompt_BxP.astype(np.int64))
    with torch.inference_mode():
      out = self.model.generate(
          input_ids=prompt, attention_mask=torch.ones_like(prompt),
          generation_config=self.generation, max_new_tokens=new_tokens,
          use_cache=True)
    return out[:, prompt.shape[1]:].numpy()

  def train_step(self):
    """One step per call, as a PyTorch training loop writes it."""
    torch = self.torch
    model = self.model
    model.train()
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{'params': matrices, 'weight_decay': OPTIMIZER['weight_decay']},
         {'params': others, 'weight_decay': 0.0}],
        lr=LEARNING_RATE, betas=(OPTIMIZER['b1'], OPTIMIZER['b2']),
        eps=OPTIMIZER['eps'])

    def run(batch):
      inputs = torch.from_numpy(batch['inputs'].astype(np.int64))
      targets = torch.from_numpy(batch['targets'].astype(np.int64))
      logits = model(input_ids=inputs).logits
      loss = torch.nn.functional.cross_entropy(
          logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(),
                                     OPTIMIZER['grad_clip'])
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
      return loss.detach().item()
    return run


def _torch_best(theirs: Theirs, fn, repeats: int) -> tuple[float, int]:
  """(fastest seconds, threads) over the thread counts asked for."""
  counts = [_TORCH_THREADS.value] if _TORCH_THREADS.value else [1, 2]
  best = None
  for n in counts:
    theirs.threads(n)
    seconds = _best_seconds(fn, repeats)
    if best is None or seconds < best[0]:
      best = (seconds, n)
  return best


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # optax's schedule notice
  # transformers' GGUF conversion bar; tqdm reads this when it is imported.
  os.environ.setdefault('TQDM_DISABLE', '1')
  path = _GGUF.value or assets.path('smollm2-135m')
  print(timing.device_line())
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  print(f'peers: transformers {transformers.__version__}, torch '
        f'{torch.__version__}; model {os.path.basename(path)} in float32')
  ours, theirs = Ours(path), Theirs(path)
  vocab = ours.config.vocab_size
  rng = np.random.default_rng(0)
  rows, ratios = [], {}

  for batch in map(int, _SAMPLE_BATCHES.value):
    prompt = rng.integers(1, vocab, (batch, _PROMPT.value)).astype(np.int32)
    new = _NEW.value
    theirs.threads(2)
    t0 = time.perf_counter()
    mine = ours.sample(prompt, new)
    first = time.perf_counter() - t0
    reference = theirs.sample(prompt, new)
    if not np.array_equal(mine, reference):
      row, col = np.argwhere(mine != reference)[0]
      raise SystemExit(f'error: greedy tokens differ at batch {batch}, row '
                       f'{row}, token {col}: sleep_jax {mine[row, col]} vs '
                       f'transformers {reference[row, col]}.')
    seconds = _best_seconds(lambda: ours.sample(prompt, new), _REPEATS.value)
    their_seconds, threads = _torch_best(
        theirs, lambda: theirs.sample(prompt, new), _REPEATS.value)
    tokens = batch * new
    name = f'sample_b{batch}'
    ratios[name] = their_seconds / seconds
    rows.append((f'greedy sampling, batch {batch}, {_PROMPT.value}-token '
                 f'prompt, {new} new tokens', f'{tokens / seconds:.1f} tok/s',
                 f'{tokens / their_seconds:.1f} tok/s ({threads} threads)',
                 ratios[name], first - seconds))
    print(f'{name}: identical greedy tokens; sleep_jax {seconds:.2f} s, '
          f'transformers {their_seconds:.2f} s', flush=True)

  toks = rng.integers(1, vocab, (_TRAIN_BATCH.value, _TRAIN_LEN.value + 1))
  batch = {'inputs': toks[:, :-1].astype(np.int32),
           'targets': toks[:, 1:].astype(np.int32),
           'mask': np.ones((_TRAIN_BATCH.value, _TRAIN_LEN.value), np.int32)}
  # First steps from the same weights: the same loss, or not the same work.
  our_step = ours.train_step()
  theirs.threads(2)
  their_step = theirs.train_step()
  t0 = time.perf_counter()
  mine = our_step(batch)
  first = time.perf_counter() - t0
  reference = their_step(batch)
  if abs(mine - reference) > 1e-4 * max(1.0, abs(reference)):
    raise SystemExit(f'error: first-step losses differ: sleep_jax {mine:.6f} '
                     f'vs transformers {reference:.6f}.')
  seconds = _best_seconds(lambda: our_step(batch), _REPEATS.value)
  their_seconds, threads = _torch_best(theirs, lambda: their_step(batch),
                                       _REPEATS.value)
  tokens = _TRAIN_BATCH.value * _TRAIN_LEN.value
  ratios['train'] = their_seconds / seconds
  rows.append((f'AdamW train step, {_TRAIN_BATCH.value}x{_TRAIN_LEN.value} '
               'tokens', f'{tokens / seconds:.0f} tok/s',
               f'{tokens / their_seconds:.0f} tok/s ({threads} threads)',
               ratios['train'], first - seconds))
  print(f'train: first-step loss {mine:.5f} (transformers {reference:.5f}); '
        f'sleep_jax {seconds:.2f} s, transformers {their_seconds:.2f} s',
        flush=True)

  print('\n| measure | sleep_jax | transformers | ratio | sleep_jax compile |')
  print('|---|---|---|---|---|')
  for what, ours_rate, their_rate, ratio, compile_s in rows:
    print(f'| {what} | {ours_rate} | {their_rate} | {ratio:.2f}x | '
          f'{compile_s:.1f} s |')
  print('peer speed sleep_jax/transformers: ' + ', '.join(
      f'{k} {v:.2f}x' for k, v in ratios.items()))


if __name__ == '__main__':
  app.run(main)
