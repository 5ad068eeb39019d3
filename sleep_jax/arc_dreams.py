"""Few-shot ARC as dreaming tasks: dreams that are training strategies.

SEAL's few-shot protocol (docs/design.md §10.2) on the dreaming stage: the
prompt is a task's demonstrations, a dream is a strategy
(`sleep_jax.data.tasks.arc`), and an isolated copy trains on the data the
strategy builds. `make_arc_tasks` gives `dreaming.Tasks` for
`dreaming.rest_em` / `dreaming.dream`.
"""

from __future__ import annotations

import numpy as np

from sleep_jax.data.tasks import arc
from sleep_jax.dream_sft import CopyData
from sleep_jax.dreaming import DreamingConfig, Tasks, pad_rows
from sleep_jax.eval import encode_items


def make_arc_tasks(tasks: list[arc.ArcTask], cfg: DreamingConfig, *,
                   width: int, prompt_width: int, batch_size: int) -> Tasks:
  """ARC-style tasks whose dreams are training strategies (SEAL few-shot).

  The prompt is the demonstrations then `arc.STRATEGY_PROMPT`; a dream is
  parsed by `arc.parse_strategy` (at most `eval_steps` steps). A valid one
  trains its copy on `batch_size` rows per step drawn from the strategy's
  leave-one-out data (`arc.leave_one_out`, rows of `width` tokens) at the
  strategy's learning rate for its number of steps; an invalid one trains
  nothing, so it cannot be rewarded. tau: the first test output solved.
  Tokens are `arc.TOKENIZER`'s.
  """
  tok = arc.TOKENIZER
  prompts = pad_rows([tok.encode(arc.strategy_prompt(t), add_bos=True)
                      for t in tasks], prompt_width, tok.pad_id,
                     'an ARC prompt')
  contexts = pad_rows([tok.encode(arc.context_text(t.train), add_bos=True)
                       for t in tasks], prompt_width, tok.pad_id,
                      'an ARC context')
  # Teacher-forced exact match of the answer = greedy decoding producing the
  # whole output grid.
  items = encode_items(tok, [arc.query(t.train, t.test[0]) for t in tasks],
                       width)

  def to_copy_data(dreams, lengths, context, host_rng) -> CopyData:
    n, steps = len(dreams), cfg.eval_steps
    tokens = np.full((n, steps, batch_size, width), tok.pad_id, np.int32)
    masks = np.zeros((n, steps, batch_size, width), np.float32)
    rates = np.full((n,), cfg.eval_learning_rate, np.float32)
    active = np.zeros((n, steps), bool)
    for i in range(n):
      strategy = arc.parse_strategy(tok.decode(dreams[i][:lengths[i]]), steps)
      if strategy is None:
        continue
      rows, row_masks = arc.leave_one_out(tasks[context[i]], strategy, width,
                                          host_rng)
      if not len(rows):
        continue
      pick = host_rng.integers(0, len(rows), (steps, batch_size))
      tokens[i], masks[i] = rows[pick], row_masks[pick]
      rates[i] = strategy.learning_rate
      active[i, :strategy.steps] = True
    return CopyData(tokens, masks, rates, active)

  return Tasks(*prompts, *contexts,
               {k: v[:, None] for k, v in items.items()}, to_copy_data)
