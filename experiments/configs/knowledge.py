r"""The knowledge-incorporation table (SQuAD, SEAL's protocol).

    python -m experiments.knowledge --config=experiments/configs/knowledge.py:cpu \
        --workdir=/tmp/knowledge

Variants (comma-separated):

* `cpu` (default): SmolLM2-135M-Instruct (the `smollm2-135m` asset) with one
  fast CMS level, aimed at 2 CPU cores. Reduced relative to SEAL: 6
  evaluated passages (SEAL: 200 in CPT) with at most 4 questions each, 4
  ReST-EM training passages (SEAL: 50), 3 self-edits per passage (SEAL: 5)
  of 48 tokens, 1 ReST-EM round (SEAL: 2), LoRA rank 16 (SEAL: 64) trained
  for 6 steps per passage, Knowledge Seeding of 4 steps, pure distillation
  (alpha=1: no LTI rollouts), 2 seeds. About 2 hours of execution on 2 CPU
  cores plus compiling (`--plan`; experiments/results/knowledge.md).
* `paper`: SEAL's sizes (n=200 evaluated passages in CPT, 50 training
  passages, 5 self-edits per passage, 2 ReST-EM rounds, LoRA r=64 alpha=128,
  lr 1e-4, the Sleep paper's 5 fast levels of width 64 for `sleep_levels`);
  meant for one large accelerator, not yet run. `--plan` prints what it
  needs before running it (memory, work, runtime estimate):
  experiments/results/knowledge.md has its output.
* `smoke`: a tiny random llama (a character tokenizer) and the six
  fixture passages of configs/data/squad_fixture.json, every row but the
  two dreaming ablations; about a minute on 2 CPU cores (CI).

Every knob is a key: `--config.data.eval_passages=20`,
`--config.rows='("base","in_context","sleep")'`, `--config.seeds='(0,1,2)'`.
"""

import os

import ml_collections

from experiments.configs import common
from sleep_jax.models.lora import ALL_KERNELS

VARIANTS = {'cpu': 'SmolLM2-135M, 2 CPU cores, ~2 h (the default)',
            'paper': "SEAL's sizes, for an accelerator",
            'smoke': 'tiny random llama, fixture passages, CI'}

_FIXTURE = os.path.join(os.path.dirname(__file__), 'data', 'squad_fixture.json')
ALL_ROWS = ('base', 'in_context', 'passage_finetune', 'implications_finetune',
            'seal', 'sleep', 'sleep_no_dreaming', 'sleep_no_gradient_selection',
            'sleep_no_random_expert', 'sleep_levels')


def _fast_level(**overrides) -> dict:
  # A width-64 level whose dense expert stays zero (update_dense=False):
  # wake writes into a grown rank-32 expert, so that Knowledge Seeding's
  # reset of that expert really empties the fast memory.
  return dict(dict(chunk_size=1, width=64, num_experts=2, rank=32, top_k=2,
                   learning_rate=1e-3, optimizer='adam', update_dense=False),
              **overrides)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, __file__, VARIANTS)
  config = ml_collections.ConfigDict()
  config.seeds = (0, 1)
  config.rows = ALL_ROWS
  config.regimes = ('single', 'cpt')
  config.backbone = ml_collections.ConfigDict(dict(
      source='asset:smollm2-135m',
      # source='random' only:
      random=dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=512,
                  seed=0)))
  config.fast_levels = [_fast_level()]
  # The `sleep_levels` row: more fast levels, each twice as slow as the one
  # before (the paper's "4 levels" backbone has 3 fast levels + the MLP).
  config.levels_fast_levels = [_fast_level(), _fast_level(chunk_size=2),
                               _fast_level(chunk_size=4)]
  config.slow_level = dict(chunk_size=0, num_experts=4, rank=16, top_k=2,
                           learning_rate=0.0, optimizer='adam')
  config.data = ml_collections.ConfigDict(dict(
      path='',  # '' = the squad-v2-dev asset (SQuAD v2.0 dev)
      train_passages=4, eval_passages=6, split_seed=0, max_questions=4))
  config.widths = ml_collections.ConfigDict(dict(
      passage=288, prompt=112, in_context=448, item=128, self_edit_prompt=352))
  # batch_size = max_questions: the single regime answers one passage's
  # questions at a time, and a batch is padded to its one shape.
  config.answer = ml_collections.ConfigDict(dict(max_new_tokens=12,
                                                 batch_size=4))
  config.judge = ml_collections.ConfigDict(dict(name='embedding',
                                                threshold=0.7))
  config.finetune = ml_collections.ConfigDict(dict(
      steps=6, cpt_steps=12, batch_size=2, learning_rate=1e-3, lora_rank=16,
      lora_alpha=32.0, lora_targets=[list(t) for t in ALL_KERNELS],
      # LoRA copies trained side by side (single regime); 0 = all at once.
      chunk_size=0))
  config.wake = ml_collections.ConfigDict(dict(steps=6))
  config.sleep = ml_collections.ConfigDict(dict(
      alpha=1.0, lmbda=0.5, divergence='jsd', num_steps=4, batch_size=4,
      learning_rate=1e-3, max_new_tokens=32, prompt_source='replay',
      min_prompt_tokens=16, temperature=1.0, judge='exact', gamma=0.0))
  # Sleep's dreaming (its ReST-EM on the training passages, and test-time
  # dreaming on the evaluated ones); `seal` overrides it for SEAL's
  # self-edits: every sample kept and scored, no random expert.
  config.dreaming = ml_collections.ConfigDict(dict(
      num_dreams=3, max_new_tokens=48, temperature=1.0, random_expert=True,
      selection='gradient', score='cosine', keep_top=1, keep_random=1,
      tau='answer_logprob', eval_steps=3, eval_learning_rate=1e-3, rounds=1,
      rest_steps=4, rest_batch_size=2, rest_learning_rate=1e-3,
      rehearse_steps=6, rehearse_batch_size=2, rehearse_learning_rate=1e-3,
      rehearse_replay=0.0, replay_samples=1, lora_rank=16, lora_alpha=32.0,
      lora_targets=[list(t) for t in ALL_KERNELS]))
  config.seal = ml_collections.ConfigDict(dict(
      selection='random', random_expert=False, keep_top=0, keep_random=3))

  if arg.paper:
    config.seeds = (0, 1, 2)
    config.data.update(train_passages=50, eval_passages=200, max_questions=8)
    config.fast_levels = [_fast_level()]
    config.levels_fast_levels = [_fast_level(chunk_size=2 ** i)
                                 for i in range(5)]
    config.slow_level['num_experts'] = 8
    config.answer.update(max_new_tokens=24, batch_size=64)
    # chunk_size: 200 rank-64 LoRA copies with Adam at once would need
    # ~196 GiB; 25 at a time ~25 GiB (`--plan` prints the estimate).
    config.finetune.update(steps=10, cpt_steps=400, batch_size=1,
                           learning_rate=1e-4, lora_rank=64, lora_alpha=128.0,
                           chunk_size=25)
    config.wake.steps = 10
    config.sleep.update(num_steps=100, batch_size=8, alpha=0.5, gamma=0.5,
                        judge='embedding', group_size=4)
    config.dreaming.update(
        num_dreams=5, max_new_tokens=256, keep_top=2, keep_random=1,
        eval_steps=10, eval_learning_rate=1e-4, rounds=2, rest_steps=50,
        rest_batch_size=8, rest_learning_rate=1e-4, rehearse_steps=100,
        rehearse_batch_size=8, rehearse_learning_rate=1e-4, lora_rank=64,
        lora_alpha=128.0, chunk_size=50)
    config.seal.keep_random = 5
    config.widths.update(self_edit_prompt=384, passage=320)
  if arg.smoke:
    config.backbone.source = 'random'
    config.seeds = (0,)
    # Every code path once, each program compiled once: the dreaming
    # ablation rows only change DreamingConfig switches (tests/test_dreaming.py
    # covers them), and `sleep` runs on the same two fast levels as
    # `sleep_levels`, so the level-by-level consolidation runs in both and
    # `sleep_levels` reuses `sleep`'s programs (~60 s less on 2 CPU cores).
    config.rows = tuple(r for r in ALL_ROWS if r not in (
        'sleep_no_gradient_selection', 'sleep_no_random_expert'))
    config.levels_fast_levels = [_fast_level(rank=4, width=8),
                                 _fast_level(rank=4, width=8, chunk_size=2)]
    config.fast_levels = [dict(level) for level in config.levels_fast_levels]
    config.slow_level['rank'] = 4
    config.data.update(path=_FIXTURE, train_passages=2, eval_passages=3,
                       max_questions=2)
    config.widths.update(passage=192, prompt=256, in_context=640, item=256,
                         self_edit_prompt=320)
    config.backbone.random.max_len = 1024
    config.answer.update(max_new_tokens=4, batch_size=8)
    config.judge.name = 'exact'
    config.finetune.update(steps=2, cpt_steps=2, batch_size=1, lora_rank=2,
                           lora_alpha=4.0)
    config.wake.steps = 2
    config.sleep.update(num_steps=1, batch_size=2, max_new_tokens=4,
                        min_prompt_tokens=4)
    # rounds=0: ReST-EM scores one round, no M-step (one program less to
    # compile in CI; tests/test_dreaming.py covers the M-step).
    config.dreaming.update(num_dreams=2, keep_top=1, keep_random=1,
                           max_new_tokens=6, eval_steps=1, rounds=0,
                           rest_steps=1, rest_batch_size=1, rehearse_steps=1,
                           rehearse_batch_size=1, lora_rank=2, lora_alpha=4.0)
    config.seal.keep_random = 2
  return config
