"""The knowledge study's table and what its rows share.

The table's rows, regimes and graders (and the paper's numbers beside
them); the config checks; the setup every row reads (the backbone with
its fast levels, the seeded disjoint train/eval passage split, the judge,
a one-device mesh); closed-book (or in-context) answers and their grades.
The rows themselves: `knowledge_rows`; the run: `knowledge`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from sleep_jax import dreaming
from sleep_jax import rewards
from sleep_jax import seeding
from sleep_jax import sharding as sharding_lib
from sleep_jax.data.tasks import squad
from sleep_jax.stage_config import with_overrides
from sleep_jax.studies import knowledge_qa as qa

ROWS = ('base', 'in_context', 'passage_finetune', 'implications_finetune',
        'seal', 'sleep', 'sleep_no_dreaming', 'sleep_no_gradient_selection',
        'sleep_no_random_expert', 'sleep_levels')
REGIMES = ('single', 'cpt')
GRADERS = ('exact', 'f1', 'semantic')
DETERMINISTIC = ('base', 'in_context')   # greedy answers, no update
# The Sleep paper's no-context SQuAD accuracy (%, single / CPT n=200; an
# LLM grader, Qwen-scale backbone): the report's side-by-side column.
PAPER = {'base': (31.9, 31.9), 'passage_finetune': (33.4, 32.0),
         'seal': (46.7, 43.2), 'sleep': (48.1, 44.3),
         'sleep_levels': (48.9, 46.2),
         'sleep_no_gradient_selection': (47.1, 45.2),
         'sleep_no_random_expert': (48.0, 44.7),
         'sleep_no_dreaming': (35.7, 36.2)}
# Rows computed together (one unit per regime and seed); a dreaming variant's
# DreamingConfig overrides.
SLEEP_VARIANTS = {'sleep': {}, 'sleep_no_gradient_selection':
                  {'selection': 'random'},
                  'sleep_no_random_expert': {'random_expert': False}}


# ------------------------------------------------------------------ setup ---


@dataclasses.dataclass
class Setup:
  """Everything the rows share: the backbone, the passages, the graders."""
  config: Any
  backbone: qa.Backbone
  train: list
  eval: list
  judge: Any
  mesh: Any
  rules: Any

  @property
  def ids(self) -> dict:
    tok = self.backbone.tokenizer
    return {'bos_id': tok.bos_id, 'eos_id': tok.eos_id, 'pad_id': tok.pad_id}

  def questions(self, passages) -> list:
    return [q for p in passages for q in p.questions]


def _capped(passages, max_questions: int):
  return [dataclasses.replace(p, questions=p.questions[:max_questions])
          for p in passages]


def validate_config(config) -> None:
  """Fails before any model loads: unknown rows, regimes, sizes."""
  for key, valid in (('rows', ROWS), ('regimes', REGIMES)):
    bad = [x for x in config[key] if x not in valid]
    if bad or not config[key]:
      raise ValueError(f'{key}={list(config[key])}: {bad or "empty"}; valid: '
                       f'{list(valid)}.')
  if not config.seeds:
    raise ValueError('seeds is empty: give at least one seed, e.g. '
                     '--config.seeds="(0,1)".')
  for key in ('train_passages', 'eval_passages', 'max_questions'):
    if int(config.data[key]) < 1:
      raise ValueError(f'data.{key}={config.data[key]} must be >= 1.')
  seeding.SeedingConfig.from_dict(config.sleep.to_dict())
  base = dreaming.DreamingConfig.from_dict(config.dreaming.to_dict())
  with_overrides(base, config.seal.to_dict(), 'seal')
  if config.judge.name not in rewards.JUDGES:
    raise ValueError(f'judge.name={config.judge.name!r}; valid: '
                     f'{list(rewards.JUDGES)}.')


def setup(config) -> Setup:
  validate_config(config)
  backbone = qa.load_backbone(config.backbone, config.fast_levels,
                              config.slow_level)
  data = config.data
  passages = squad.load(data.path or None)
  train, evaluated = squad.split(passages, train=int(data.train_passages),
                                 eval=int(data.eval_passages),
                                 seed=int(data.split_seed))
  evaluated = _capped(evaluated, int(data.max_questions))
  judge = rewards.make_judge(config.judge.name,
                             threshold=config.judge.threshold)
  # One device: on N processes each runs the whole study on its own first
  # device (the same work, no collectives) and process 0 writes.
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1},
                                jax.local_devices()[:1])
  return Setup(config, backbone, train, evaluated, judge, mesh,
               sharding_lib.DEFAULT_RULES)


# ---------------------------------------------------------------- grading ---


def grade(s: Setup, passages, predictions: list[str]) -> dict:
  """Mean of each grader over `passages`' questions, and the predictions."""
  questions = s.questions(passages)
  scores = squad.grade(predictions, [q.answers for q in questions], s.judge)
  out = {g: float(np.mean(scores[g])) for g in GRADERS if g in scores}
  out['predictions'] = {q.id: p for q, p in zip(questions, predictions)}
  return out


def answers(s: Setup, passages, params, model_state=None, *,
            in_context: bool = False, backbone=None) -> list[str]:
  backbone = backbone or s.backbone
  prompts = [qa.question_prompt(backbone, q.question,
                                p.context if in_context else None)
             for p in passages for q in p.questions]
  widths = s.config.widths
  return qa.answer(backbone, params, backbone.model_state
                   if model_state is None else model_state, prompts,
                   width=int(widths.in_context if in_context else widths.prompt),
                   max_new_tokens=int(s.config.answer.max_new_tokens),
                   batch_size=int(s.config.answer.batch_size))
