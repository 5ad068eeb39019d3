r"""The Knowledge Seeding study: consolidation of a fast level's facts.

It measures Knowledge Seeding in isolation: how much of what a fast level
learned moves into a new slow-level expert (docs/design.md §4, §10.2).

    python -m experiments.seeding --config=experiments/configs/seeding.py \
        --workdir=/tmp/seeding

Variants: `:sweep` (each knob's values one at a time, plus the best setting
found: 8 runs), `:smoke` (seconds, CI); comma-separated. Ablate any knob with
`--config.sleep.alpha=1` and so on (every field of
sleep_jax.seeding.SeedingConfig is a key).
A tiny CMS LM learns a base population; a fast-level expert learns 16 new
people in wake (the teacher); Knowledge Seeding moves them into a new
slow-level expert. See README ("Knowledge Seeding") for measured numbers and
runtimes (about 6 min for the default on 2 CPU cores, 26 min for `:sweep`).
"""

import ml_collections

from sleep_jax.sharding import DEFAULT_RULES


def _sweep():
  """Each knob's values, one at a time around the default (alpha=.5, lmbda=.5,
  gamma=.5): alpha in {0, .5, 1}, lmbda in {0, .5, 1}, gamma in {0, .5};
  plus the default with twice the KS steps, and the best setting measured
  (distillation on teacher samples only, 600 steps)."""
  return [dict(), dict(alpha=0.0), dict(alpha=1.0), dict(lmbda=0.0),
          dict(lmbda=1.0), dict(gamma=0.0), dict(num_steps=600),
          dict(alpha=1.0, lmbda=0.0, num_steps=600)]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.world_seed = 0
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=512, d_model=96, num_layers=3, num_heads=4, num_kv_heads=2,
      d_ff=256, max_len=64, mlp='cms', cms_levels=[
          dict(chunk_size=1, width=64, num_experts=4, rank=16, top_k=2,
               learning_rate=2e-3, optimizer='adam', update_dense=False),
          dict(chunk_size=0, width=256, num_experts=4, rank=16, top_k=2,
               learning_rate=0.0, optimizer='adam', update_dense=False)]))
  config.data = ml_collections.ConfigDict(dict(seq_len=40,
                                               tokenizer_vocab_size=400))
  config.stream = ml_collections.ConfigDict(dict(
      base_people=300, sessions=1, people_per_session=16, batch_size=32))
  config.base_train_steps = 1500
  config.wake_steps = 150
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=100, min_lr_ratio=0.1, b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.1, grad_clip=1.0))
  config.sleep = ml_collections.ConfigDict(dict(
      alpha=0.5, lmbda=0.5, lmbda_mode='sample', divergence='jsd', beta=0.5,
      temperature=1.0, gamma=0.5, z0=8.0, group_size=4,
      normalize_advantages=False, judge='embedding', judge_threshold=0.8,
      num_steps=300, batch_size=16, learning_rate=1e-2, max_new_tokens=16,
      prompt_source='mixed', bos_fraction=0.25, min_prompt_tokens=2,
      expansion=True))
  config.sweep = []
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding = ml_collections.ConfigDict(dict(
      rules=[list(rule) for rule in DEFAULT_RULES]))

  for variant in [v for v in (arg or '').split(',') if v]:
    if variant == 'sweep':
      config.sweep = _sweep()
    elif variant == 'smoke':
      config.model.update(d_model=32, num_layers=1, d_ff=64)
      config.model.cms_levels = [dict(level, width=32, rank=4)
                                 for level in config.model.cms_levels]
      config.stream.update(base_people=20, people_per_session=4, batch_size=8)
      config.base_train_steps = 20
      config.optimizer.warmup_steps = 5
      config.wake_steps = 5
      config.sleep.update(num_steps=3, batch_size=8, group_size=2,
                          max_new_tokens=6, judge='exact')
    else:
      raise ValueError(f'Unknown variant {variant!r} of seeding.py; valid: '
                       '"" (default), "sweep", "smoke" (comma-separated).')
  return config
