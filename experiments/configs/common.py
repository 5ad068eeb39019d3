"""What the configs share: the `:arg` parser and the repeated blocks.

A config reads the part of `--config=path:arg` after the colon with
`parse_arg`, then applies the variants it was given in its own fixed order
(so `:smoke,full` and `:full,smoke` are the same config):

    VARIANTS = {'full': 'all methods, 5 seeds', 'smoke': 'a tiny model, CI'}

    def get_config(arg=None):
      arg = common.parse_arg(arg, __file__, VARIANTS)
      config = ...
      if arg.full:
        ...
      if arg.smoke:
        ...
"""

import os
from typing import Any, Mapping

import ml_collections

from sleep_jax.sharding import DEFAULT_RULES

_TRUE, _FALSE = ('true', 'yes', '1'), ('false', 'no', '0')


def parse_arg(arg: str | None, file: str, variants: Mapping[str, str], /,
              **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `arg`, the comma-separated `:arg` of `--config=file:arg`.

  Each item is a variant name, a key of `variants` (name -> a few words of
  help), or `key=value` with `key` one of `defaults`; the value is read as
  the default's type (bool: true/false, yes/no, 1/0; int; float; str).
  Returns a ConfigDict with every variant as a bool (given or not) and every
  key's value (given or the default). Anything else is a one-line
  ValueError naming the file, the item and the valid choices.
  """
  name = os.path.basename(file)
  clash = sorted(set(variants) & set(defaults))
  if clash:
    raise ValueError(f'{name}: {clash} are both variants and keys.')
  for key, default in defaults.items():
    if type(default) not in (bool, int, float, str):
      raise TypeError(f'{name}: key {key!r} has a default of type '
                      f'{type(default).__name__}; only bool, int, float and '
                      'str can be given as key=value.')
  result = ml_collections.ConfigDict(
      {**{v: False for v in variants}, **defaults})

  def valid() -> str:
    names = ', '.join(f'{v} ({h})' if h else v for v, h in variants.items())
    keys = ', '.join(f'{k}={d!r} ({type(d).__name__})'
                     for k, d in defaults.items())
    return (f'valid: "" (default), {names}' + (f'; keys: {keys}' if keys
                                                else '')
            + ' (comma-separated)')

  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    if '=' not in item:
      if item not in variants:
        raise ValueError(f'Unknown variant {item!r} of {name}; {valid()}')
      result[item] = True
      continue
    key, value = (s.strip() for s in item.split('=', 1))
    if key not in defaults:
      raise ValueError(f'Unknown key {key!r} in {item!r} of {name}; '
                       f'{valid()}')
    result[key] = _typed(value, defaults[key],
                         f'{item!r} of {name}: {key} takes')
  return result


def _typed(value: str, default, where: str):
  kind = type(default)
  if kind is bool:
    if value.lower() in _TRUE + _FALSE:
      return value.lower() in _TRUE
  else:
    try:
      return kind(value)
    except ValueError:
      pass
  article = 'an' if kind is int else 'a'
  raise ValueError(f'{where} {article} {kind.__name__} (default {default!r}), '
                   f'not {value!r}')


def fact_world_model(**overrides) -> ml_collections.ConfigDict:
  """The tiny CMS LM of the fact-world studies: three layers, a fast level
  (width 64) before a slow one (width 256), four expert slots each."""
  return ml_collections.ConfigDict(dict(dict(
      vocab_size=512, d_model=96, num_layers=3, num_heads=4, num_kv_heads=2,
      d_ff=256, max_len=64, mlp='cms', cms_levels=[
          dict(chunk_size=1, width=64, num_experts=4, rank=16, top_k=2,
               learning_rate=2e-3, optimizer='adam', update_dense=False),
          dict(chunk_size=0, width=256, num_experts=4, rank=16, top_k=2,
               learning_rate=0.0, optimizer='adam', update_dense=False)]),
      **overrides))


def fact_world_data(**overrides) -> ml_collections.ConfigDict:
  """Rows of one sentence, and the tokenizer trained on the world."""
  return ml_collections.ConfigDict(dict(
      dict(seq_len=40, tokenizer_vocab_size=400), **overrides))


def smoke_model(model: ml_collections.ConfigDict, **level_overrides) -> None:
  """Shrinks a `fact_world_model` in place for `smoke`: one narrow layer,
  and `level_overrides` (e.g. width=32) on every CMS level."""
  model.update(d_model=32, num_layers=1, d_ff=64)
  model.cms_levels = [dict(level, **level_overrides)
                      for level in model.cms_levels]


def optimizer(**overrides) -> ml_collections.ConfigDict:
  """AdamW with warmup and cosine decay (sleep_jax.training.make_optimizer)."""
  return ml_collections.ConfigDict(dict(dict(
      learning_rate=3e-3, warmup_steps=100, min_lr_ratio=0.1, b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.1, grad_clip=1.0), **overrides))


def mesh() -> ml_collections.ConfigDict:
  """Every device on the data axis (-1: all that are left)."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def sharding() -> ml_collections.ConfigDict:
  """sleep_jax.sharding's default logical-axis rules."""
  return ml_collections.ConfigDict(dict(
      rules=[list(rule) for rule in DEFAULT_RULES]))
