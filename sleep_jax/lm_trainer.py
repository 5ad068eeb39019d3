"""The language-model trainer: `train(config, workdir)`.

Reads nothing from flags; `experiments/train_lm.py` parses them and calls
this. The workdir ends up holding:

    config.json         the resolved config
    tokenizer.model     the SentencePiece model trained on the corpus
    data/               the tokenised corpus as array_record
    checkpoints/        Orbax steps of {state, data iterator, metadata}
    metrics.jsonl       one line per logged step; TensorBoard events in
    tensorboard/

Re-running the same command resumes from the latest checkpoint, data
iterator included, and reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import sleep_jax
from sleep_jax import metrics as metrics_lib
from sleep_jax import sampling
from sleep_jax import sharding as sharding_lib
from sleep_jax import training
from sleep_jax.checkpoints import Checkpointer
from sleep_jax.data import corpus, pipeline, tokenizers
from sleep_jax.models import Transformer, TransformerConfig, count_params

_DATA_SOURCES = ('array_record', 'memory')


def validate_config(config) -> TransformerConfig:
  """Checks every key the trainer reads; fails before anything compiles."""
  model_config = TransformerConfig.from_dict(config.model, key='model')
  data = config.data
  if data.source not in _DATA_SOURCES:
    raise ValueError(f'data.source={data.source!r} is invalid; valid: '
                     f'{list(_DATA_SOURCES)}.')
  if data.seq_len < 2 or data.seq_len > model_config.max_len:
    raise ValueError(f'data.seq_len={data.seq_len} must be in [2, '
                     f'model.max_len={model_config.max_len}].')
  if data.tokenizer_vocab_size > model_config.vocab_size:
    raise ValueError(
        f'data.tokenizer_vocab_size={data.tokenizer_vocab_size} exceeds '
        f'model.vocab_size={model_config.vocab_size}; make model.vocab_size >= '
        'the tokenizer vocabulary.')
  if config.num_train_steps < 1:
    raise ValueError(f'num_train_steps={config.num_train_steps} must be >= 1.')
  for key in ('log_every_steps', 'checkpoint_every_steps'):
    if config[key] < 1:
      raise ValueError(f'{key}={config[key]} must be >= 1.')
  mesh = sharding_lib.resolve_mesh_shape(dict(config.mesh), jax.device_count())
  batch_shards = mesh[0] * mesh[1]
  if data.batch_size % batch_shards or data.batch_size % jax.process_count():
    raise ValueError(
        f'data.batch_size={data.batch_size} must be divisible by the mesh\'s '
        f'data*fsdp={batch_shards} and by the process count '
        f'{jax.process_count()}.')
  rules = sharding_lib.rules_from_config(config.sharding.rules)
  boxed = jax.eval_shape(Transformer(model_config).init, jax.random.key(0),
                         jnp.ones((1, 1), jnp.int32))  # traces, never compiles
  sharding_lib.check_divisible(boxed, dict(zip(sharding_lib.MESH_AXES, mesh)),
                               rules)
  training.make_optimizer(config.optimizer, config.num_train_steps)
  return model_config


def prepare_data(config, workdir: str):
  """Corpus -> tokenizer (trained once, saved) -> token documents.

  Returns (tokenizer, train source, eval documents).
  """
  data = config.data
  texts = corpus.generate_corpus(data.num_documents + data.eval_documents,
                                 seed=data.corpus_seed)
  train_texts, eval_texts = texts[data.eval_documents:], texts[:data.eval_documents]
  tok_path = os.path.join(workdir, tokenizers.TOKENIZER_FILENAME)
  if os.path.exists(tok_path):
    tokenizer = tokenizers.SentencePieceTokenizer.load(tok_path)
  else:
    tokenizer = tokenizers.SentencePieceTokenizer.train(
        train_texts, data.tokenizer_vocab_size)
    if jax.process_index() == 0:
      tokenizer.save(tok_path)
  encode = lambda texts: [
      np.asarray(tokenizer.encode(t, add_bos=True, add_eos=True), np.int32)
      for t in texts]
  eval_docs = encode(eval_texts)
  if data.source == 'memory':
    return tokenizer, encode(train_texts), eval_docs
  path = os.path.join(workdir, 'data', f'train-{jax.process_index()}.array_record')
  if not os.path.exists(path):  # a resumed run reuses the tokenised corpus
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pipeline.write_array_record(path + '.tmp', encode(train_texts))
    os.replace(path + '.tmp', path)
  return tokenizer, pipeline.ArrayRecordTokens(path), eval_docs


def _global_batch(local: Mapping[str, np.ndarray], batch_shard):
  return {k: jax.make_array_from_process_local_data(batch_shard, v)
          for k, v in local.items()}


def _eval_loss(model, params, model_state, eval_batches) -> float:
  # Sums stay on device; one host transfer at the end.
  total, count = 0.0, 0.0
  for batch in eval_batches:
    loss, tokens = _eval_step(model, params, batch, model_state)
    total, count = total + loss * tokens, count + tokens
  total, count = jax.device_get((total, count))
  return float(total) / max(float(count), 1.0)


_eval_step = jax.jit(training.lm_loss, static_argnums=0)


def train(config, workdir: str, *, stop_after: int | None = None
          ) -> dict[str, Any]:
  """Trains (or resumes) the LM described by `config` in `workdir`.

  Args:
    config: an ml_collections ConfigDict (see experiments/configs/train_lm.py).
    workdir: output directory; resumed from if it holds checkpoints.
    stop_after: stop (with a checkpoint) once this step is reached, as a
      preempted job would; the schedule still follows num_train_steps.

  Returns:
    {'step', 'loss', 'eval_loss', 'params', 'sample', ...} of the last step
    (final_metrics.json), and 'state': the trained TrainState, laid out on
    the mesh (on a pod, each process holds its shards).
  """
  if stop_after is not None and stop_after < 1:
    raise ValueError(f'--stop_after={stop_after} must be >= 1 (a step '
                     'number); leave it out to train num_train_steps.')
  model_config = validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config.to_dict(), f, indent=2, default=str)

  tokenizer, train_source, eval_docs = prepare_data(config, workdir)
  mesh = sharding_lib.make_mesh(dict(config.mesh))
  rules = sharding_lib.rules_from_config(config.sharding.rules)
  model = Transformer(model_config)
  total_steps = config.num_train_steps
  optimizer, schedule = training.make_optimizer(config.optimizer, total_steps)

  example = jnp.ones((1, config.data.seq_len), jnp.int32)
  init_args = (functools.partial(training.create_train_state, model, optimizer),
               mesh, rules, jax.random.key(config.seed), example)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'),
                      max_to_keep=config.keep_checkpoints)
  abstract, state_shardings = sharding_lib.abstract_sharded(*init_args)
  dataset = pipeline.lm_dataset(
      train_source, seq_len=config.data.seq_len,
      batch_size=config.data.batch_size,
      seed=config.seed, packing=config.data.packing, pad_id=tokenizer.pad_id,
      shard_index=jax.process_index(), shard_count=jax.process_count())
  data_iter = iter(dataset)
  # Restored straight into the shardings: no fresh state is built first.
  newest = ckpt.restore_newest(abstract, data_iter)
  if newest:
    start, state, _ = newest
    print(f'resumed from checkpoint step {start}', flush=True)
  else:
    start = 0
    data_iter = iter(dataset)  # a failed restore may have moved it
    state, state_shardings = sharding_lib.init_sharded(*init_args)
  num_params = count_params(state.params)
  logging.info('Model: %s params, config %s', f'{num_params:,}', model_config)
  print(f'model: {num_params:,} parameters; mesh {dict(mesh.shape)}', flush=True)


  step_fn = training.compile_train_step(model, optimizer, schedule,
                                        state_shardings, mesh, rules)
  batch_shard = sharding_lib.batch_sharding(mesh, rules)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  last_step = min(total_steps, stop_after or total_steps)
  progress = metrics_lib.Progress(last_step, first_step=start)
  metadata = {'config': config.to_dict(), 'sleep_jax_version': sleep_jax.__version__,
              'tokenizer': tokenizers.TOKENIZER_FILENAME}
  pending = None  # (step, device metrics) fetched after the next dispatch
  last = {}
  t_start = time.perf_counter()

  def flush(pending, force_log=False):
    step, dev_metrics = pending
    host = jax.device_get(dev_metrics)
    metrics_lib.check_finite(step, {'loss': host['loss'],
                                    'grad_norm': host['grad_norm']})
    if force_log or step % config.log_every_steps == 0:
      writer.write(step, host)
      progress.update(step, {'loss': host['loss']}, force=force_log)
    return host

  try:
    for step in range(start + 1, last_step + 1):
      batch = _global_batch(next(data_iter), batch_shard)
      state, dev_metrics = step_fn(state, batch)
      if pending is not None:
        last = flush(pending)
      pending = (step, dev_metrics)
      if step % config.checkpoint_every_steps == 0 and step != last_step:
        last = flush(pending)  # never checkpoint a diverged state
        pending = None
        ckpt.save(step, state, data_iter, metadata)
    if pending is not None:
      last = flush(pending, force_log=True)
    if last_step > start:
      ckpt.save(last_step, state, data_iter, metadata, force=True)
    ckpt.wait()
  finally:
    writer.close()
    ckpt.close()

  eval_ds = pipeline.lm_dataset(
      eval_docs, seq_len=config.data.seq_len,
      batch_size=min(config.data.batch_size, len(eval_docs)),
      seed=0, packing=False, shuffle=False, num_epochs=1, pad_id=tokenizer.pad_id)
  eval_loss = _eval_loss(model, state.params, state.model_state, list(eval_ds))
  prompt = tokenizer.encode(config.sample_prompt, add_bos=True)
  out = sampling.sample(model, state.params, np.asarray([prompt], np.int32),
                        np.asarray([len(prompt)], np.int32),
                        max_new_tokens=config.sample_tokens,
                        rng=jax.random.key(0), eos_id=tokenizer.eos_id,
                        model_state=state.model_state)
  generated = np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist()
  # Decode prompt and continuation together so word boundaries survive.
  text = tokenizer.decode(prompt + generated)
  result = {'step': last_step, 'loss': float(last.get('loss', float('nan'))),
            'eval_loss': eval_loss, 'params': num_params,
            'seconds': time.perf_counter() - t_start, 'sample': text}
  print(f'eval loss {eval_loss:.4f} | greedy sample: {result["sample"]!r}',
        flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
      json.dump(result, f, indent=2)
  return dict(result, state=state)
