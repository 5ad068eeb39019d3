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

from sleep_jax.models.lora import ALL_KERNELS
from sleep_jax.sharding import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.world_seed = 0
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=512, d_model=96, num_layers=3, num_heads=4, num_kv_heads=2,
      d_ff=256, max_len=160, mlp='cms', cms_levels=[
          dict(chunk_size=1, width=64, num_experts=4, rank=16, top_k=2,
               learning_rate=2e-3, optimizer='adam', update_dense=False),
          dict(chunk_size=0, width=256, num_experts=4, rank=16, top_k=2,
               learning_rate=0.0, optimizer='adam', update_dense=False)]))
  config.data = ml_collections.ConfigDict(dict(seq_len=104,
                                               tokenizer_vocab_size=500))
  config.stream = ml_collections.ConfigDict(dict(
      base_people=100, sessions=1, people_per_session=16, batch_size=32,
      reading_people=3000, closed_book_repeats=4))
  config.base_train_steps = 2000
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=100, min_lr_ratio=0.1, b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.1, grad_clip=1.0))
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
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding = ml_collections.ConfigDict(dict(
      rules=[list(rule) for rule in DEFAULT_RULES]))

  for variant in [v for v in (arg or '').split(',') if v]:
    if variant == 'ablations':
      config.runs = [dict(), dict(random_expert=False),
                     dict(selection='random'), dict(enabled=False)]
    elif variant == 'templates':
      config.runs = [dict(template=t) for t in
                     ('continue', 'rewrite', 'implications', 'self_qa')]
    elif variant == 'smoke':
      config.model.update(d_model=32, num_layers=1, d_ff=64)
      config.model.cms_levels = [dict(level, width=32, rank=4)
                                 for level in config.model.cms_levels]
      config.stream.update(base_people=10, people_per_session=2, batch_size=8,
                           reading_people=20)
      config.base_train_steps = 10
      config.optimizer.warmup_steps = 2
      config.dreaming.update(num_dreams=3, max_new_tokens=4, keep_top=1,
                             keep_random=1, eval_steps=2, rounds=1,
                             rest_steps=2, rest_batch_size=2, rehearse_steps=2,
                             rehearse_batch_size=2, replay_samples=2,
                             lora_rank=2)
    else:
      raise ValueError(f'Unknown variant {variant!r} of dreaming.py; valid: '
                       '"" (default), "ablations", "templates", "smoke" '
                       '(comma-separated).')
  return config
