"""The continual knowledge-incorporation experiment (docs/design.md §10.1).

`run(config, workdir)`:

1. checks the whole config (every error names its key) before anything is
   built or compiled;
2. builds the world of fictional people as a TFDS dataset under
   `<workdir>/data` and reads it back with `tfds.data_source` + grain
   (sleep_jax.studies.world_tfds): passages and closed-book questions per
   session;
3. trains the base model (the base population closed-book, plus reading
   documents about people met nowhere else, so that it can continue a
   passage it reads) or reuses the one cached under
   `<workdir>/base/<hash of the config it depends on>`;
4. runs every method with every seed through every session
   (sleep_jax.lifecycle), each resuming from its own checkpoints;
5. writes results.json (docs/design.md §8), metrics.jsonl + TensorBoard
   events, report.md and plots/ (sleep_jax.studies.report).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from sleep_jax import dreaming
from sleep_jax import eval as eval_lib
from sleep_jax import lifecycle
from sleep_jax import metrics as metrics_lib
from sleep_jax import multihost
from sleep_jax import resources
from sleep_jax import rewards
from sleep_jax import sharding
from sleep_jax import workdir as workdir_lib
from sleep_jax.data.tokenizers import SentencePieceTokenizer
from sleep_jax.models import Transformer
from sleep_jax.studies import continual_checks
from sleep_jax.studies import fact_world
from sleep_jax.studies import facts
from sleep_jax.studies import report
from sleep_jax.studies import results as results_lib
from sleep_jax.studies import world_tfds

# Keys whose values decide the base model (and the tokenizer): a change in
# any of them trains a new one, anything else reuses it.
_BASE_KEYS = ('model', 'data', 'world', 'base', 'optimizer')


def code_version() -> str:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root,
                          capture_output=True, text=True, check=True,
                          timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


# ------------------------------------------------------------------- data ---


def _by_person(records) -> dict[str, list[dict]]:
  out = {}
  for r in records:
    out.setdefault(r['person'], []).append(r)
  return out


def _sentences(records) -> list[str]:
  """Each passage's sentences, one row each: wake learns facts, not
  passage layouts, and consolidation replays short prefixes."""
  return [s for r in records for s in re.split(r'(?<=\.) ', r['text'])]


@dataclasses.dataclass
class World:
  """The job's world as arrays.

  base_rows: what the base model trains on (base-population passages,
    `closed_book_repeats` times, and reading documents);
  base_replay: the base population's passage sentences as wake-width rows
    (only the `replay_all` oracle stores them);
  base_items: held-out items of the base population (evaluation only);
  sessions: one `lifecycle.Session` per session.
  """
  tokenizer: Any
  base_rows: dict
  base_replay: dict
  base_items: dict
  sessions: list


def _items(tokenizer, records, split: str, seq_len: int):
  return eval_lib.encode_items(
      tokenizer, [(r['prompt'], r['answer']) for r in records
                  if r['split'] == split], seq_len)


def load_world(config, parsed, workdir: str, tokenizer_path: str,
               log=print) -> World:
  """The TFDS world as arrays; the tokenizer (trained on passage sentences
  only, never a held-out question) is kept next to the base model.

  Held-out items go to `Session.items` and `World.base_items`, which only
  the evaluation reads; dreaming's tau scores probe items (`Session.tasks`).
  """
  world = parsed['world']
  passages, questions = world_tfds.read_sessions(
      os.path.join(workdir, 'data'), world, log)
  readers = facts.strangers(int(config.world.reading_people),
                            [p.name for _, p in world.people()], world.seed)
  if os.path.exists(tokenizer_path):
    tokenizer = SentencePieceTokenizer.load(tokenizer_path)
  else:
    texts = [s for _, p in world.people() for s in facts.passage_sentences(p)]
    texts += [s for p in readers for s in facts.passage_sentences(p)]
    tokenizer = SentencePieceTokenizer.train(
        texts, int(config.data.tokenizer_vocab_size))
  if tokenizer.vocab_size > parsed['model'].vocab_size:
    raise ValueError(f'the tokenizer has {tokenizer.vocab_size} ids but '
                     f'model.vocab_size={parsed["model"].vocab_size}; raise it.')
  seq_len = int(config.data.seq_len)
  encoder = fact_world.FactWorld(tokenizer, [], [], seq_len)
  documents = fact_world.FactWorld(tokenizer, [], [],
                                   int(config.data.document_len))
  repeats = int(config.world.closed_book_repeats)
  base_rows = documents.rows(_sentences(passages[0]) * repeats)
  if readers:
    docs = documents.documents(readers, np.random.default_rng(world.seed))
    base_rows = {k: np.concatenate([base_rows[k], docs[k]]) for k in docs}
  sessions = []
  width = int(config.data.document_len)
  dream_cfg = parsed['dreaming']
  for t in range(1, world.sessions + 1):
    people = _by_person(passages[t])
    asked = _by_person(questions[t])
    tasks = dreaming.make_tasks(
        tokenizer, [recs[0]['text'] for recs in people.values()],
        [_items(tokenizer, asked[name], 'probe', seq_len) for name in people],
        dream_cfg.template, width)
    sessions.append(lifecycle.Session(
        rows=encoder.rows(_sentences(passages[t])), tasks=tasks,
        items=_items(tokenizer, questions[t], 'held_out', seq_len)))
  return World(tokenizer, base_rows, encoder.rows(_sentences(passages[0])),
               _items(tokenizer, questions[0], 'held_out', seq_len), sessions)


# ------------------------------------------------------------- base model ---


def base_model(config, parsed, model, rows, directory: str, mesh, rules,
               log=print):
  """(params, model_state) of the base model: restored from `directory` if a
  run with the same base config saved it there, else trained and saved."""
  template = ml_collections.ConfigDict(dict(
      base_train_steps=int(config.base.train_steps), seed=int(config.base.seed),
      stream=dict(batch_size=int(config.base.batch_size)),
      data=dict(seq_len=int(config.data.document_len)),
      optimizer=config.optimizer.to_dict()))

  def train():
    t0 = time.perf_counter()
    log(f'training the base model ({template.base_train_steps} steps) -> '
        f'{directory}')
    trained = fact_world.train_base(model, template, rows, mesh, rules,
                                    experts_per_level=parsed['base_experts'])
    metrics_lib.write_json(
        os.path.join(directory, 'base.json'),
        {'seconds': time.perf_counter() - t0,
         'config': {k: config[k].to_dict() for k in _BASE_KEYS}})
    return trained

  return fact_world.restore_or_train(directory, train, log)


# -------------------------------------------------------------------- run ---


_HEADLINE = ('final_acc_all', 'final_base_acc', 'final_acc', 'bwt',
             'forgetting')


def summarize(per_seed: list[dict]) -> dict:
  """One method's entry of results.json from its per-seed runs: the mean
  accuracy matrix, each headline score's mean and sample std over seeds
  (`<key>_std`), and the per-seed runs."""
  t = len(per_seed[0]['acc_matrix'])
  mean = [[float(np.mean([r['acc_matrix'][i][j] for r in per_seed]))
           if j <= i else None for j in range(t)] for i in range(t)]
  entry = {'acc_matrix': mean}
  for key in _HEADLINE:
    values = [r[key] for r in per_seed]
    entry[key] = float(np.mean(values))
    entry[f'{key}_std'] = float(np.std(values, ddof=1 if len(values) > 1
                                       else 0))
  entry.update(
      base_acc=entry['final_base_acc'],  # older name (docs/design.md §8)
      params=int(per_seed[0]['params']),
      seconds=float(sum(r['seconds'] for r in per_seed)),
      compile_seconds=float(sum(r.get('compile_seconds', 0.0)
                                for r in per_seed)),
      per_seed=per_seed)
  return entry


def _per_seed(seed: int, records: list[dict], item_counts: list[int],
              base_items: int) -> dict:
  t = len(records)
  matrix = [[r['acc'][j] if j <= i else None for j in range(t)]
            for i, r in enumerate(records)]
  final_base = records[-1]['base_acc']
  return {'seed': seed, 'acc_matrix': matrix,
          'final_acc_all': eval_lib.acc_all(matrix[-1], final_base,
                                            item_counts[:t], base_items),
          'final_base_acc': final_base,
          'final_acc': eval_lib.final_acc(matrix), 'bwt': eval_lib.bwt(matrix),
          'forgetting': eval_lib.forgetting(matrix),
          'base_acc': final_base, 'params': records[-1]['params'],
          'seconds': sum(r['seconds'] for r in records),
          # Cycles restored from checkpoints written before this was
          # recorded count none.
          'compile_seconds': sum(r.get('compile_seconds', 0.0)
                                 for r in records),
          'cycles': [{k: r[k] for k in ('grown', 'reset', 'sleep', 'base_acc',
                                        'stages')}
                     for r in records]}


# Keys that do not change any (method, seed)'s numbers: which of them run.
_NOT_RUN_KEYS = ('methods', 'seeds')


def run(config, workdir: str, log=print) -> dict[str, Any]:
  """The whole job in `workdir` (see the module docstring); returns what it
  writes to results.json.

  A workdir holds one config: a re-run with other methods or seeds adds to
  its results, one that changes anything else is refused before anything
  is written (sleep_jax.workdir). The command line also locks it against a
  second process (sleep_jax.cli).
  """
  given = config.to_dict()
  config = continual_checks.scaled_config(config)
  parsed = continual_checks.validate_config(config)
  model = Transformer(parsed['model'])
  resources.check_fits(
      model, max(int(config.base.batch_size), int(config.wake.batch_size)),
      max(int(config.data.document_len), int(config.data.seq_len)),
      'model.d_model, model.d_ff, model.num_layers or model.vocab_size '
      '(or base.batch_size / data.document_len)')
  workdir_lib.prepare(workdir)
  config_dict = config.to_dict()
  # Compiler settings can change the numbers: JAX_DISABLE_MOST_OPTIMIZATIONS
  # (the test suite sets it) is part of what a base model and a run are.
  # Unset adds no key, so caches made before this check stay valid.
  optimized = not jax.config.read('jax_disable_most_optimizations')
  compiler = {} if optimized else {'xla_optimize': False}
  identity = {**{k: v for k, v in config_dict.items()
                 if k not in _NOT_RUN_KEYS}, **compiler}
  workdir_lib.require_directories(workdir, ('base', 'checkpoints', 'data',
                                            'plots', 'tensorboard'))
  results_path = os.path.join(workdir, 'results.json')
  earlier_results = _earlier_results(results_path, log)
  workdir_lib.check_same_run(workdir, identity, earlier_results)
  if config_dict != given:
    log('scaled to ' + ', '.join(
        f'{k}={config[k.split(".")[0]][k.split(".")[1]]}'
        for k in config.capacity.scaled) +
        f' for {config.world.people_per_session} people per session')
  metrics_lib.write_json(os.path.join(workdir, 'config.json'), config_dict)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding.rules)
  data_devices = int(np.prod([mesh.shape[a] for a in ('data', 'fsdp')
                               if a in mesh.shape]))
  batches = [('wake.batch_size', int(config.wake.batch_size))]
  if float(config.wake.get('anchor_weight', 0.0)) > 0:
    batches.append(('sleep.anchor_batch_size',
                    parsed['seeding'].anchor_batch_size))
  for key, rows in batches:
    if rows % data_devices:
      raise ValueError(f'{key}={rows} must divide evenly over the '
                       f'{data_devices} data-parallel devices of the mesh; '
                       'use a multiple of it.')
  base_dir = os.path.join(workdir, 'base', results_lib.config_hash(
      {**{k: config[k].to_dict() for k in _BASE_KEYS},
       'world_format': facts.FORMAT_VERSION, **compiler}))
  os.makedirs(base_dir, exist_ok=True)
  tokenizer_file = 'tokenizer.model'
  tokenizer_path = os.path.join(base_dir, tokenizer_file)
  fact_world.checked_file(base_dir, tokenizer_file, log)
  world = load_world(config, parsed, workdir, tokenizer_path, log)
  tokenizer, base_items, sessions = (world.tokenizer, world.base_items,
                                     world.sessions)
  if not os.path.exists(tokenizer_path):
    tokenizer.save(tokenizer_path)
    fact_world.record_file(base_dir, tokenizer_file)
  params, model_state = base_model(config, parsed, model, world.base_rows,
                                   base_dir,
                                   mesh, rules, log)
  base_acc = eval_lib.recall_accuracy(model, params, model_state, base_items)
  log(f'base model: closed-book recall of the base population '
      f'{100 * base_acc:.1f}%')
  seeding_cfg = parsed['seeding']
  compute_steps = -(-continual_checks.sleep_training_rows(
      config, int(config.world.people_per_session)) // int(
          config.wake.batch_size))
  judge = rewards.make_judge(seeding_cfg.judge,
                             threshold=seeding_cfg.judge_threshold,
                             tokenizer=tokenizer)
  settings = lifecycle.Settings(
      model=model, sessions=sessions, base_items=base_items,
      wake_steps=int(config.wake.steps), batch_size=int(config.wake.batch_size),
      seeding=seeding_cfg, dreaming=parsed['dreaming'],
      baselines=parsed['baselines'],
      token_ids={'bos_id': tokenizer.bos_id, 'eos_id': tokenizer.eos_id,
                 'pad_id': tokenizer.pad_id},
      decode=tokenizer.decode, judge=judge, mesh=mesh, rules=rules,
      lineage={'config_hash': results_lib.config_hash(config_dict),
               # What a (method, seed) run's cycles depend on: the config
               # but for which methods and seeds run alongside it.
               'run_hash': results_lib.config_hash(
                   {**{k: v for k, v in config_dict.items()
                       if k not in _NOT_RUN_KEYS},
                    'xla_optimize': optimized}),
               'code_version': code_version(),
               'base': os.path.relpath(base_dir, workdir)},
      base_replay=world.base_replay, compute_steps=compute_steps,
      wake_anchor_weight=float(config.wake.get('anchor_weight', 0.0)),
      method_seeding=parsed['sleep_per_method'],
      divergence_steps=int(config.get('divergence_steps', 10)))
  writer = metrics_lib.MetricWriter(workdir, resume_step=2**62, log=log)
  base_info = {}
  if os.path.exists(os.path.join(base_dir, 'base.json')):
    with open(os.path.join(base_dir, 'base.json')) as f:
      base_info = {'seconds': json.load(f)['seconds']}
  # Same config (check_same_run): its finished (method, seed) runs are kept.
  earlier = {m: {int(r['seed']): r for r in entry.get('per_seed', [])}
             for m, entry in (earlier_results or {}).get('methods', {}).items()}
  results = {'methods': {}, 'seeds': parsed['seeds'], 'config': config_dict,
             'base': {'acc': base_acc, **base_info},
             **({'config_given': given} if given != config_dict else {}),
             'items': {'base': len(base_items['inputs']),
                       'sessions': [len(x.items['inputs']) for x in sessions]},
             'finetune_compute_steps': compute_steps,
             'chance': 1.0 / len(facts.ATTRIBUTES['city']),
             'asked': [[m, s] for m in parsed['methods']
                       for s in parsed['seeds']]}
  progress = _JobProgress(len(parsed['methods']) * len(parsed['seeds']) *
                          len(sessions))

  def write_results(runs: dict, finished: bool) -> None:
    merged = {m: dict(seeds) for m, seeds in earlier.items()}
    for name, seeds in runs.items():
      merged.setdefault(name, {}).update(seeds)
    order = list(parsed['methods']) + [m for m in merged
                                       if m not in parsed['methods']]
    results['methods'] = {
        m: summarize([merged[m][s] for s in sorted(merged[m])])
        for m in order if merged.get(m)}
    results['seeds'] = sorted({s for m in merged.values() for s in m})
    results['complete'] = [[m, s] for m in order
                           for s in sorted(merged.get(m, {}))]
    results['finished'] = finished
    metrics_lib.write_json(results_path, results)

  runs = {}
  try:
    for name in parsed['methods']:
      for seed in parsed['seeds']:
        tag, before = f'{name}/seed{seed}', progress.done
        def on_cycle(record, tag=tag, before=before):
          scalars = {f'{tag}/acc_mean': float(np.mean(record['acc'])),
                     f'{tag}/base_acc': record['base_acc'],
                     f'{tag}/seconds': record['seconds']}
          scalars.update({f'{tag}/acc_session{j}': a
                          for j, a in enumerate(record['acc'])})
          scalars.update({f'{tag}/{k}': v for k, v in record['sleep'].items()})
          writer.write(record['cycle'], scalars)
          return progress.cycle_done(before + record['cycle'] + 1,
                                     record['seconds'])
        lifecycle_run = lifecycle.Lifecycle(
            name, seed, settings,
            os.path.join(workdir, 'checkpoints', name, f'seed_{seed}'),
            log=log)
        records = lifecycle_run.run(params, model_state, on_cycle=on_cycle)
        progress.done = before + len(sessions)
        runs.setdefault(name, {})[seed] = _per_seed(
            seed, records, [len(x.items['inputs']) for x in sessions],
            len(base_items['inputs']))
        write_results(runs, finished=False)
      entry = results['methods'][name]
      log(f'[{name}] final ACC all {100 * entry["final_acc_all"]:.1f} ± '
          f'{100 * entry["final_acc_all_std"]:.1f}% (base '
          f'{100 * entry["final_base_acc"]:.1f}, sessions '
          f'{100 * entry["final_acc"]:.1f}), BWT {100 * entry["bwt"]:+.1f} ± '
          f'{100 * entry["bwt_std"]:.1f}, forgetting '
          f'{100 * entry["forgetting"]:.1f} over seeds '
          f'{sorted(r["seed"] for r in entry["per_seed"])}')
  finally:
    writer.close()
  write_results(runs, finished=True)
  if multihost.is_writer():
    report.write_report(results, workdir)
  log(f'wrote {results_path}, report.md, plots/')
  return results


def _earlier_results(path: str, log) -> dict | None:
  """An earlier results.json of this workdir, or None. One that does not
  read back (cut short by a full disk) is set aside, not lost: the runs
  asked for now are restored from their checkpoints."""
  if not os.path.exists(path):
    return None
  try:
    return metrics_lib.read_json(path)
  except ValueError as e:
    log(f'{e}.')
    results_lib.set_aside(path, log)
    return None


class _JobProgress:
  """The job's (method, seed, cycle) count and ETA. Cycles restored from
  checkpoints count as done; the ETA uses only the ones run here."""

  def __init__(self, total: int):
    self.total, self.done = total, 0
    self._ran, self._seconds = 0, 0.0

  def cycle_done(self, done: int, seconds: float) -> str:
    self.done = done
    self._ran += 1
    self._seconds += seconds
    eta = (self.total - done) * self._seconds / self._ran
    return (f'job {done}/{self.total} cycles, ETA '
            f'{metrics_lib.format_seconds(eta)}')
