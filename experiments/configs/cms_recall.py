"""The CMS wake study: online fast levels vs frozen MLPs on a stream.

It measures the wake update in isolation: how many facts from a stream
the online fast levels keep (docs/design.md §2, §10.2).

    python -m experiments.cms_recall --config=experiments/configs/cms_recall.py \
        --workdir=/tmp/cms_recall

Variants: `:levels3`, `:levels4` (more CMS levels), `:smoke` (seconds, CI).
A tiny CMS LM learns the language of a world of fictional people from a base
population, then lives through sessions of new people. `frozen` never
updates its MLP levels; `online` runs the wake update. After each session we
ask closed-book recall questions ("<Name> lives in" -> city) about every
session so far. See README ("CMS wake study") for measured numbers and
runtimes.
"""

import ml_collections

from sleep_jax.sharding import DEFAULT_RULES


def _levels(n: int):
  """n CMS levels: n-1 fast levels (width 64) and a slow one (width 256)."""
  fast = [dict(chunk_size=2 ** i, width=64, num_experts=4, rank=8, top_k=2,
               learning_rate=3e-4, optimizer='adam', update_dense=True)
          for i in range(n - 1)]
  slow = dict(chunk_size=0, width=256, num_experts=4, rank=8, top_k=2,
              learning_rate=0.0, optimizer='adam', update_dense=False)
  return fast + [slow]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.world_seed = 0
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=512, d_model=96, num_layers=3, num_heads=4, num_kv_heads=2,
      d_ff=256, max_len=64, mlp='cms', cms_levels=_levels(2)))
  config.data = ml_collections.ConfigDict(dict(seq_len=40,
                                               tokenizer_vocab_size=400))
  config.stream = ml_collections.ConfigDict(dict(
      base_people=300, sessions=4, people_per_session=16,
      steps_per_session=60, batch_size=32))
  config.base_train_steps = 1500
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=100, min_lr_ratio=0.1, b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.1, grad_clip=1.0))
  config.methods = ('frozen', 'online')
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding = ml_collections.ConfigDict(dict(
      rules=[list(rule) for rule in DEFAULT_RULES]))

  variants = [v for v in (arg or '').split(',') if v]
  for variant in variants:
    if variant in ('levels3', 'levels4'):
      config.model.cms_levels = _levels(int(variant[-1]))
    elif variant == 'smoke':
      config.model.update(d_model=32, num_layers=1, d_ff=64)
      config.model.cms_levels = [dict(level, width=min(level['width'], 48))
                                 for level in config.model.cms_levels]
      config.stream.update(base_people=20, sessions=2, people_per_session=4,
                           steps_per_session=5, batch_size=8)
      config.base_train_steps = 20
      config.optimizer.warmup_steps = 5
    else:
      raise ValueError(f'Unknown variant {variant!r} of cms_recall.py; valid: '
                       '"" (default), "levels3", "levels4", "smoke" '
                       '(comma-separated).')
  return config
