"""Hyper-parameters of the llama/qwen-family transformer.

`TransformerConfig` is a frozen (hashable) dataclass, so it can be a static
argument of `jax.jit`. It validates itself on construction: a bad value fails
here, before anything is traced or compiled, with a message naming the field,
the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_MLP_KINDS = ('swiglu', 'cms')
CMS_OPTIMIZERS = ('sgd', 'adam', 'adamw')


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling. Only Llama 3's "llama3" rule is implemented."""

  kind: str = 'llama3'
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192

  def __post_init__(self):
    if self.kind != 'llama3':
      raise ValueError(
          f'RopeScaling.kind={self.kind!r} is not supported; valid: "llama3" '
          '(or rope_scaling=None for plain RoPE).')
    if self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(
          f'RopeScaling.high_freq_factor={self.high_freq_factor} must be '
          f'greater than low_freq_factor={self.low_freq_factor}.')


@dataclasses.dataclass(frozen=True)
class CMSLevel:
  """One level of the Continuum Memory System (docs/design.md §2-3).

  A level is a dense SwiGLU expert plus `num_experts` pre-allocated low-rank
  experts (inactive until grown) behind a router. Levels are listed fastest
  first; the last one is the slowest (the backbone MLP in pretrained mode).

  Attributes:
    chunk_size: C: the level's params change every C wake steps, by the
      update accumulated over the chunk. 0 = never updated in wake (allowed
      for trailing levels only). Each non-zero C must divide the next one.
    width: hidden width of the dense expert; None = TransformerConfig.d_ff.
    num_experts: E_max, the number of pre-allocated low-rank expert slots.
    rank: r, the inner width of each low-rank expert; must be < width.
    top_k: experts used per token, counting the dense expert, which is
      always kept; the other top_k - 1 are the active low-rank experts with
      the largest router logits. At most num_experts + 1.
    learning_rate: wake learning rate of this level.
    optimizer: wake optimiser of this level: 'sgd', 'adam' or 'adamw'.
    update_dense: whether wake updates the dense expert too, or only the
      active low-rank experts and their router rows.
    gate_bias: a constant added to every low-rank expert's router logit
      before its sigmoid gate. 0 opens a fresh expert (zero router row)
      halfway on every token; a negative value keeps it nearly closed
      until its router row learns where to open, so a consolidated expert
      can stay local. Growth stays exactly function-preserving (B = 0).
  """

  chunk_size: int = 1
  width: int | None = None
  num_experts: int = 4
  rank: int = 8
  top_k: int = 2
  learning_rate: float = 1e-2
  optimizer: str = 'adam'
  update_dense: bool = True
  gate_bias: float = 0.0

  def validate(self, key: str) -> None:
    """Raises ValueError naming `key.<field>`, the value and the fix."""
    for name in ('num_experts', 'rank', 'top_k'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'{key}.{name}={value!r} is invalid: it must be an '
                         'integer >= 1.')
    if not isinstance(self.chunk_size, int) or self.chunk_size < 0:
      raise ValueError(f'{key}.chunk_size={self.chunk_size!r} is invalid: it '
                       'must be an integer >= 1, or 0 for "never updated in '
                       'wake".')
    if self.width is not None and (not isinstance(self.width, int)
                                   or self.width < 1):
      raise ValueError(f'{key}.width={self.width!r} is invalid: use a positive '
                       'integer, or None for d_ff.')
    if self.top_k > self.num_experts + 1:
      raise ValueError(
          f'{key}.top_k={self.top_k} is larger than the experts of the level '
          f'(1 dense + num_experts={self.num_experts}); use top_k <= '
          f'{self.num_experts + 1}.')
    if self.learning_rate < 0:
      raise ValueError(f'{key}.learning_rate={self.learning_rate} must be '
                       '>= 0.')
    if (isinstance(self.gate_bias, bool)
        or not isinstance(self.gate_bias, (int, float))
        or not math.isfinite(self.gate_bias)):
      raise ValueError(f'{key}.gate_bias={self.gate_bias!r} is invalid: use a '
                       'finite number (0 = gates start at 0.5; e.g. -4 keeps '
                       'fresh experts nearly closed).')
    if self.optimizer not in CMS_OPTIMIZERS:
      raise ValueError(f'{key}.optimizer={self.optimizer!r} is invalid; valid: '
                       f'{list(CMS_OPTIMIZERS)}.')

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], key: str) -> 'CMSLevel':
    values = dict(values)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f'Unknown config key(s) {[f"{key}.{u}" for u in unknown]}'
                       f'; valid keys: {sorted(fields)}.')
    return cls(**values)


def _validate_cms_levels(levels, d_ff: int, key: str) -> None:
  if not levels:
    raise ValueError(f"{key}=() is empty, but mlp='cms' needs at least one "
                     'level (the last one is the slowest).')
  for i, level in enumerate(levels):
    level.validate(f'{key}[{i}]')
    width = level.width or d_ff
    if level.rank >= width:
      raise ValueError(
          f'{key}[{i}].rank={level.rank} must be smaller than the level width '
          f'({width}); low-rank experts need rank < width.')
  sizes = [level.chunk_size for level in levels]
  for i in range(len(levels) - 1):
    here, after = sizes[i], sizes[i + 1]
    if here == 0 and after != 0:
      raise ValueError(
          f'{key}[{i}].chunk_size=0 (never updated) but level {i + 1} has '
          f'chunk_size={after}; only the slowest, trailing levels may be 0.')
    if here and after and after % here:
      raise ValueError(
          f'{key}[{i + 1}].chunk_size={after} is not a multiple of '
          f'{key}[{i}].chunk_size={here}; each level\'s chunk size must divide '
          f'the next (got {sizes}).')


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A decoder-only llama/qwen-family transformer.

  Attributes:
    vocab_size: number of token ids.
    d_model: residual stream width.
    num_layers: number of transformer blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); must divide
      num_heads.
    d_ff: hidden width of the SwiGLU MLP.
    head_dim: per-head width; None means d_model // num_heads (then d_model
      must be divisible by num_heads). Qwen3 sets it explicitly.
    rope_theta: RoPE base.
    rope_scaling: optional `RopeScaling` ("llama3").
    norm_eps: RMSNorm epsilon.
    qkv_bias: biases on the q/k/v projections (Qwen2).
    qk_norm: per-head RMSNorm on queries and keys before RoPE (Qwen3).
    tie_embeddings: the output projection is the transposed embedding.
    dtype: compute dtype, 'float32' or 'bfloat16'. Params are always float32
      and logits are returned in float32.
    max_len: the longest sequence the model is meant for (used for sampler
      cache sizes and config checks, not by the math).
    mlp: the kind of MLP in each block's MLP slot: 'swiglu', or 'cms' (a
      chain of `cms_levels`, see sleep_jax.models.cms).
    cms_levels: the CMS levels (fastest first) when mlp == 'cms'.
    remat: rematerialise each block in the backward pass (saves memory).
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  d_ff: int
  head_dim: int | None = None
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  qk_norm: bool = False
  tie_embeddings: bool = True
  dtype: str = 'float32'
  max_len: int = 2048
  mlp: str = 'swiglu'
  cms_levels: tuple[CMSLevel, ...] = ()
  remat: bool = False

  def __post_init__(self):
    for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads',
                 'num_kv_heads', 'd_ff', 'max_len'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(
            f'TransformerConfig.{name}={value!r} is invalid: it must be a '
            'positive integer.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'TransformerConfig.num_heads={self.num_heads} must be a multiple of '
          f'num_kv_heads={self.num_kv_heads}; valid num_kv_heads for '
          f'num_heads={self.num_heads}: {_divisors(self.num_heads)}.')
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
          f'TransformerConfig.d_model={self.d_model} is not divisible by '
          f'num_heads={self.num_heads}; valid num_heads for '
          f'd_model={self.d_model}: {_divisors(self.d_model)} '
          '(or set head_dim explicitly).')
    if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
      raise ValueError(
          f'TransformerConfig.head_dim={self.head_dim} must be a positive even '
          'integer (RoPE rotates pairs of dimensions).')
    if self.head_dim is None and (self.d_model // self.num_heads) % 2:
      raise ValueError(
          f'TransformerConfig: d_model/num_heads = {self.d_model}/'
          f'{self.num_heads} = {self.d_model // self.num_heads} is odd; RoPE '
          'needs an even head_dim.')
    if self.dtype not in _DTYPES:
      raise ValueError(
          f'TransformerConfig.dtype={self.dtype!r} is invalid; valid: '
          f'{sorted(_DTYPES)}.')
    if self.mlp not in _MLP_KINDS:
      raise ValueError(
          f'TransformerConfig.mlp={self.mlp!r} is invalid; valid: '
          f'{list(_MLP_KINDS)}.')
    levels = tuple(l if isinstance(l, CMSLevel)
                   else CMSLevel.from_dict(l, f'model.cms_levels[{i}]')
                   for i, l in enumerate(self.cms_levels or ()))
    object.__setattr__(self, 'cms_levels', levels)
    if self.mlp == 'cms':
      _validate_cms_levels(levels, self.d_ff, 'model.cms_levels')
    elif levels:
      raise ValueError(
          f'TransformerConfig.cms_levels has {len(levels)} level(s) but '
          f"mlp={self.mlp!r}; set mlp='cms' to use them, or cms_levels=().")
    if self.rope_theta <= 0:
      raise ValueError(
          f'TransformerConfig.rope_theta={self.rope_theta} must be positive.')
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, 'rope_scaling', RopeScaling(**self.rope_scaling))

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], key: str = 'model'
                ) -> 'TransformerConfig':
    """Builds a config from a mapping (e.g. an ml_collections ConfigDict).

    Unknown keys are an error naming `key.<name>`, so a typo in a
    `--config.model.x=...` override does not pass silently.
    """
    values = dict(values)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(
          f'Unknown config key(s) {[f"{key}.{u}" for u in unknown]}; valid '
          f'keys under {key!r}: {sorted(fields)}.')
    scaling = values.get('rope_scaling')
    if scaling is not None and not isinstance(scaling, RopeScaling):
      values['rope_scaling'] = RopeScaling(**dict(scaling))
    return cls(**values)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  def num_params(self, include_embedding: bool = True) -> int:
    """Exact parameter count, computed from the shapes (no arrays made)."""
    d, h, kv, hd = (self.d_model, self.num_heads, self.num_kv_heads,
                    self.resolved_head_dim)
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if self.qkv_bias:
      attn += h * hd + 2 * kv * hd
    if self.qk_norm:
      attn += 2 * hd
    if self.mlp == 'cms':
      mlp = sum(3 * d * (level.width or self.d_ff)
                + level.num_experts * (2 * d * level.rank + d)
                for level in self.cms_levels)
    else:
      mlp = 3 * d * self.d_ff
    per_layer = attn + mlp + 2 * d  # two RMSNorm scales
    total = self.num_layers * per_layer + d  # final norm
    if include_embedding:
      total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
    elif not self.tie_embeddings:
      total += self.vocab_size * d  # the output head is a real matmul
    return total

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward).

    Counts every matmul, the output head included, and the attention score
    and value matmuls at full (non-causal-discounted) length, as in the
    PaLM appendix convention: 6 * N_matmul + 12 * layers * heads*head_dim * L.
    """
    matmul_params = self.num_params(include_embedding=False)
    if self.tie_embeddings:
      matmul_params += self.vocab_size * self.d_model
    attention = 12 * self.num_layers * self.num_heads * self.resolved_head_dim * seq_len
    return 6 * matmul_params + attention
