"""A ~1.5M-parameter llama-style LM on the generated corpus (CPU, minutes).

Default (1,541,760 params, 600 steps of 16 x 128 tokens):

    python -m experiments.train_lm --config=experiments/configs/train_lm.py \
        --workdir=/tmp/train_lm

  Expected on a 2-core CPU: ~4.5 minutes (2.3 steps/s); final train loss
  ~0.75, eval loss ~0.76 (measured: 0.750 / 0.761); greedy sample for
  "Ada lives in": "Ada lives in Fenhollow and works as a baker." On one GPU:
  well under a minute.

Smoke (106,816 params, 20 steps; for CI and for checking a setup):

    python -m experiments.train_lm \
        --config=experiments/configs/train_lm.py:smoke --workdir=/tmp/smoke

  Expected: ~10 seconds on CPU, most of it compiling; loss falls from ~6.3
  (step 5) to ~4.6 (step 20), eval loss ~4.6.

CMS variants (`:cms2`, `:cms3`, `:cms4`; combine with smoke as
`:smoke,cms3`) make the MLP slot a chain of 2-4 CMS levels: fast levels of
width 64 (chunk sizes 1, 4, 16) before a slow level of width d_ff, each with
4 low-rank expert slots of rank 8. The stream of facts those levels learn
from online is experiments/configs/cms_recall.py.

Any field can be overridden, e.g. `--config.model.num_layers=2`,
`--config.optimizer.learning_rate=1e-3`, `--config.mesh.data=-1`.
Re-running the same command in the same workdir resumes.
"""

import ml_collections

from experiments.configs import common

VARIANTS = {'smoke': 'tiny, 20 steps', 'cms2': '2 CMS levels',
            'cms3': '3 CMS levels', 'cms4': '4 CMS levels'}


def cms_levels(num_levels: int) -> list[dict]:
  """num_levels CMS levels: fast width-64 levels, then a slow width-d_ff one."""
  fast = [dict(chunk_size=4 ** i, width=64, num_experts=4, rank=8, top_k=2,
               learning_rate=1e-3, optimizer='adam', update_dense=True)
          for i in range(num_levels - 1)]
  slow = dict(chunk_size=4 ** (num_levels - 1), width=None, num_experts=4,
              rank=8, top_k=2, learning_rate=1e-4, optimizer='adam',
              update_dense=True)
  return fast + [slow]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, __file__, VARIANTS)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=512, d_model=128, num_layers=6, num_heads=4, num_kv_heads=2,
      d_ff=512, head_dim=None, rope_theta=10_000.0, rope_scaling=None,
      norm_eps=1e-6, qkv_bias=False, qk_norm=False, tie_embeddings=True,
      dtype='float32', max_len=512, mlp='swiglu', cms_levels=[], remat=False))
  config.data = ml_collections.ConfigDict(dict(
      source='array_record',  # or 'memory'
      num_documents=20_000, eval_documents=256, corpus_seed=0,
      tokenizer_vocab_size=512, seq_len=128, batch_size=16, packing=True))
  config.optimizer = common.optimizer(warmup_steps=50)
  config.num_train_steps = 600
  config.log_every_steps = 10
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  config.mesh = common.mesh()
  config.sharding = common.sharding()
  config.sample_prompt = 'Ada lives in'
  config.sample_tokens = 24

  for n in (2, 3, 4):
    if arg[f'cms{n}']:
      config.model.mlp = 'cms'
      config.model.cms_levels = cms_levels(n)
  if arg.smoke:
    config.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        d_ff=128)
    config.data.update(num_documents=2_000, eval_documents=32, seq_len=64,
                       batch_size=8, tokenizer_vocab_size=512)
    config.optimizer.warmup_steps = 5
    config.num_train_steps = 20
    config.log_every_steps = 5
    config.checkpoint_every_steps = 10
    config.sample_tokens = 8
  return config
