"""A study's results bookkeeping: what a results file may keep from an
earlier run, and the hashes that name a config or a base model's numbers.

Nothing a run replaces is ever deleted: an earlier file of other settings,
or a damaged cache, is moved aside (`set_aside`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import numpy as np


def set_aside(path: str, log=print, label: str = 'earlier',
              why: str | None = None) -> str | None:
  """Renames an existing file or directory `path` to `path.<label>-<time>`
  (returned): nothing a run replaces (an earlier complete result, a damaged
  cache) is ever deleted."""
  if not os.path.exists(path):
    return None
  aside = stem = f"{path}.{label}-{time.strftime('%Y%m%d-%H%M%S')}"
  n = 1
  while os.path.exists(aside):  # two set aside within one second
    aside, n = f'{stem}.{n}', n + 1
  os.replace(path, aside)
  log(f'{path} is damaged ({why}); moved it to {aside} and building it '
      'again.' if why else
      f'moved the earlier {os.path.basename(path)} to {aside}')
  return aside


def as_json(value):
  """`value` as it reads back from a JSON file (tuples become lists), so it
  compares equal to what an earlier results.json holds."""
  return json.loads(json.dumps(value))


def kept_run(done: list[dict], key: str, settings) -> dict | None:
  """The entry of `done` (an earlier results.json's runs) recorded with
  these `settings` under `key`, if any."""
  settings = as_json(settings)
  return next((e for e in done if e[key] == settings), None)


def runs_not_asked(done: list[dict], runs: list[dict], key: str) -> list[dict]:
  """The entries of `done` whose settings under `key` no entry of `runs`
  has: earlier runs a re-run keeps in the file apart (`other_runs`)."""
  asked = [r[key] for r in runs]
  return [e for e in done if e[key] not in asked]


def earlier_results(path: str, config, ignore, same) -> dict | None:
  """The earlier results file at `path` (a study's results.json) if a re-run
  may keep what it holds, else None.

  It may if its 'config' equals `config` apart from the top-level keys in
  `ignore` (those its entries record one by one, e.g. the runs asked for),
  and its value of each key of `same` equals that one (e.g. recall measured
  before any run: the same base model). Any other earlier file is
  `set_aside` whole: results of other settings or of another base model are
  never overwritten, and never mixed with this run's.
  """
  if not os.path.exists(path):
    return None
  with open(path) as f:
    earlier = json.load(f)
  settings = lambda c: {k: v for k, v in c.items() if k not in ignore}
  now = settings(as_json(config.to_dict()))
  if (settings(earlier.get('config', {})) == now
      and all(earlier.get(k) == as_json(v) for k, v in same.items())):
    return earlier
  set_aside(path)
  return None


def config_hash(tree) -> str:
  """12 hex digits naming a JSON-able config tree (key order ignored)."""
  return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str)
                        .encode()).hexdigest()[:12]


def fingerprint(params, model_state) -> dict[str, str]:
  """What identifies a base model's numbers in a study's results.json: a
  SHA-256 of every array (restored from its checkpoint, or retrained), and
  the backend and matmul precision that evaluate it. Recall alone cannot
  tell two well-trained base models apart (both score 1.0)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      jax.device_get((params, model_state))):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}'
                  .encode())
    digest.update(leaf.tobytes())
  return {'sha256': digest.hexdigest(), 'backend': jax.default_backend(),
          'matmul_precision': str(jax.config.jax_default_matmul_precision)}
