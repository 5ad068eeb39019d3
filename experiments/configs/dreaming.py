r"""The dreaming study: ReST-EM and rehearsal on a toy world.

It measures dreaming in isolation, without consolidation before it
(docs/design.md §5, §10.2).

    python -m experiments.dreaming --config=experiments/configs/dreaming.py \
        --workdir=/tmp/dreaming

Variants: `:ablations` (default, - random expert, - gradient selection,
- dreaming: 4 runs from one base model), `:templates` (the four prompt
templates, one base model), `:smoke` (seconds, CI);
comma-separated. Any knob: `--config.dreaming.rounds=2` (every field of
sleep_jax.dreaming.DreamingConfig is a key). A tiny CMS LM learns a base
population closed-book and learns to read passages; dreaming then turns 16
passages about new people into closed-book knowledge in a new slow-level
expert. See README ("Dreaming") for measured numbers and runtimes.
"""

import ml_collections

from experiments.configs import common
from sleep_jax.models.lora import ALL_KERNELS

VARIANTS = {'ablations': '4 runs: - random expert, - gradient selection, '
                         '- dreaming',
            'templates': 'the four prompt templates', 'smoke': 'seconds, CI'}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, __file__, VARIANTS)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.world_seed = 0
  config.model = common.fact_world_model(max_len=160)
  config.data = common.fact_world_data(seq_len=104, tokenizer_vocab_size=500)
  config.stream = ml_collections.ConfigDict(dict(
      base_people=100, sessions=1, people_per_session=16, batch_size=32,
      reading_people=3000, closed_book_repeats=4))
  config.base_train_steps = 2000
  config.optimizer = common.optimizer()
  config.base_experts = [0, 2]   # trained with the base model, per level
  config.rehearse_level = 1
  config.prompt_width = 96
  config.dreaming = ml_collections.ConfigDict(dict(
      enabled=True, num_dreams=16, max_new_tokens=28, temperature=1.0,
      top_k=0, top_p=1.0, random_expert=True, template='continue',
      selection='gradient', score='cosine', keep_top=6, keep_random=2,
      tau='accuracy', eval_steps=4, eval_learning_rate=1e-2, chunk_size=0,
      rounds=3, rest_steps=30, rest_batch_size=8, rest_learning_rate=3e-3,
      rehearse_steps=300, rehearse_batch_size=32,
      rehearse_learning_rate=3e-3, rehearse_replay=8.0, replay_samples=2048,
      lora_rank=8, lora_alpha=16.0,
      lora_targets=[list(t) for t in ALL_KERNELS]))
  config.runs = []
  config.mesh = common.mesh()
  config.sharding = common.sharding()

  if arg.ablations:
    config.runs = [dict(), dict(random_expert=False),
                   dict(selection='random'), dict(enabled=False)]
  if arg.templates:
    config.runs = [dict(template=t) for t in
                   ('continue', 'rewrite', 'implications', 'self_qa')]
  if arg.smoke:
    common.smoke_model(config.model, width=32, rank=4)
    config.stream.update(base_people=10, people_per_session=2, batch_size=8,
                         reading_people=20)
    config.base_train_steps = 10
    config.optimizer.warmup_steps = 2
    config.dreaming.update(num_dreams=3, max_new_tokens=4, keep_top=1,
                           keep_random=1, eval_steps=2, rounds=1,
                           rest_steps=2, rest_batch_size=2, rehearse_steps=2,
                           rehearse_batch_size=2, replay_samples=2,
                           lora_rank=2)
  return config
