"""Building blocks of the transformer: RMSNorm, RoPE, GQA attention, SwiGLU.

Shape suffixes: B batch, L query length, S key/cache length, D d_model,
H query heads, K kv heads, G = H // K query heads per kv head, Dh head_dim,
F MLP hidden width, V vocab.

Every parameter carries logical axis names (`nn.with_logical_partitioning`);
a rules table in the config maps them to mesh axes (sleep_jax.sharding).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleep_jax.models.config import RopeScaling, TransformerConfig

Array = jax.Array
KVCache = list  # [{'k': f[B, S, K, Dh], 'v': f[B, S, K, Dh]} per layer]

_NEG_INF = -1e30  # finite, so fully-masked rows give a uniform softmax, not NaN


def _kernel_init(fan_in_axes_size: int):
  return nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in_axes_size))


LORA_COLLECTION = 'lora'


def lora_delta(module: nn.Module, kernel_name: str, x, input_ndim: int,
               out_shape):
  """x's LoRA correction for `kernel_name`, or 0 if no adapter is passed.

  An adapter arrives as the 'lora' variable collection (see
  sleep_jax.models.lora.as_collection): {'a': [in, r], 'b': [r, out]} with
  the scale folded into b. Computing (x @ a) @ b next to x @ W, instead of
  merging W + a @ b, lets many adapters share one base matmul under vmap.
  """
  if not module.has_variable(LORA_COLLECTION, kernel_name):
    return 0.0
  adapter = module.get_variable(LORA_COLLECTION, kernel_name)
  lead = x.shape[:x.ndim - input_ndim]
  # One 2-D [tokens, in] matrix, for the reason token_matmul gives (an SFT
  # step of one LoRA on 64 rows of 29 tokens: 122 ms, against 67 ms flat).
  x_TxI = x.reshape(math.prod(lead), -1)
  h_TxR = x_TxI @ adapter['a'].astype(x.dtype)
  return (h_TxR @ adapter['b'].astype(x.dtype)).reshape(lead + tuple(out_shape))


def token_matmul(x, kernel, input_ndim: int = 1):
  """x [..., *in] @ kernel [*in, *out] as one 2-D [tokens, in] x [in, out]
  matmul. With the batch and length axes kept apart, XLA:CPU forms the
  weight gradient's contraction over them through strided transposed copies
  of the activations (the SmolLM2-135M train step: 1.5x slower MLP backward
  than flattened). lora_delta flattens its input for the same reason."""
  lead = x.shape[:x.ndim - input_ndim]
  in_shape = x.shape[x.ndim - input_ndim:]
  out_shape = kernel.shape[input_ndim:]
  y = x.reshape(math.prod(lead), math.prod(in_shape)) @ kernel.reshape(
      math.prod(in_shape), math.prod(out_shape))
  return y.reshape(lead + out_shape)


class RMSNorm(nn.Module):
  """RMSNorm computed in float32, scaled by a learned per-feature weight."""

  eps: float
  axis_name: str = 'norm'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones,
                                              (self.axis_name,)),
        (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * scale).astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float,
                     scaling: RopeScaling | None) -> Array:
  """Inverse frequencies [Dh/2] of RoPE, with optional "llama3" scaling."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv_freq
  # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and
  # the band in between interpolated smoothly.
  low_wavelen = scaling.original_max_position / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = ((scaling.original_max_position / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_BxLxNxDh: Array, positions_BxL: Array, inv_freq: Array) -> Array:
  """Rotates pairs (i, i + Dh/2) — the "rotate half" layout of HF Llama/Qwen."""
  angles_BxLxF = positions_BxL[..., None].astype(jnp.float32) * inv_freq
  sin = jnp.sin(angles_BxLxF)[:, :, None, :]
  cos = jnp.cos(angles_BxLxF)[:, :, None, :]
  x = x_BxLxNxDh.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxDh.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with an optional functional KV cache."""

  config: TransformerConfig

  def _proj(self, x, name, heads, head_axis):
    cfg = self.config
    hd = cfg.resolved_head_dim
    kernel = self.param(
        f'{name}_kernel',
        nn.with_logical_partitioning(_kernel_init(cfg.d_model),
                                     ('embed', head_axis, 'head_dim')),
        (cfg.d_model, heads, hd), jnp.float32)
    y = token_matmul(x, kernel.astype(cfg.compute_dtype))
    y = y + lora_delta(self, f'{name}_kernel', x, 1, (heads, hd))
    if cfg.qkv_bias:
      bias = self.param(
          f'{name}_bias',
          nn.with_logical_partitioning(nn.initializers.zeros,
                                       (head_axis, 'head_dim')),
          (heads, hd), jnp.float32)
      y = y + bias.astype(cfg.compute_dtype)
    return y

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, *, segment_ids_BxL=None,
               cache=None):
    cfg = self.config
    hd, kv_heads = cfg.resolved_head_dim, cfg.num_kv_heads
    groups = cfg.num_heads // kv_heads
    q = self._proj(x_BxLxD, 'q', cfg.num_heads, 'heads')
    k = self._proj(x_BxLxD, 'k', kv_heads, 'kv_heads')
    v = self._proj(x_BxLxD, 'v', kv_heads, 'kv_heads')
    if cfg.qk_norm:
      q = RMSNorm(cfg.norm_eps, 'head_dim', cfg.compute_dtype, name='q_norm')(q)
      k = RMSNorm(cfg.norm_eps, 'head_dim', cfg.compute_dtype, name='k_norm')(k)
    inv_freq = rope_frequencies(hd, cfg.rope_theta, cfg.rope_scaling)
    q_BxLxHxDh = apply_rope(q, positions_BxL, inv_freq)
    k_BxLxKxDh = apply_rope(k, positions_BxL, inv_freq)
    q_BxLxHxDh = nn.with_logical_constraint(
        q_BxLxHxDh, ('batch', 'length', 'heads', 'head_dim'))

    batch, length = positions_BxL.shape
    if cache is None:
      keys, values = k_BxLxKxDh, v
      idx = jnp.arange(length)
      mask_BxLxS = jnp.broadcast_to(idx[None, :, None] >= idx[None, None, :],
                                    (batch, length, length))
      if segment_ids_BxL is not None:
        same = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
        mask_BxLxS = mask_BxLxS & same
      new_cache = None
    else:
      if segment_ids_BxL is not None:
        raise ValueError('segment_ids (packing) cannot be combined with a KV '
                         'cache; pass one sequence per row.')
      # Cache slot == absolute position: write this call's keys at their
      # positions, then attend to every slot at or before the query position.
      rows = jnp.arange(batch)[:, None]
      keys = cache['k'].at[rows, positions_BxL].set(
          k_BxLxKxDh.astype(cache['k'].dtype))
      values = cache['v'].at[rows, positions_BxL].set(v.astype(cache['v'].dtype))
      new_cache = {'k': keys, 'v': values}
      slots = jnp.arange(keys.shape[1])
      mask_BxLxS = slots[None, None, :] <= positions_BxL[:, :, None]
      keys = keys.astype(cfg.compute_dtype)
      values = values.astype(cfg.compute_dtype)

    q_BxLxKxGxDh = q_BxLxHxDh.reshape(batch, length, kv_heads, groups, hd)
    scores = jnp.einsum('blkgd,bskd->bkgls', q_BxLxKxGxDh, keys,
                        preferred_element_type=jnp.float32) / math.sqrt(hd)
    scores = jnp.where(mask_BxLxS[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
    out = jnp.einsum('bkgls,bskd->blkgd', probs, values)
    out_BxLxHxDh = out.reshape(batch, length, cfg.num_heads, hd)
    o_kernel = self.param(
        'o_kernel',
        nn.with_logical_partitioning(_kernel_init(cfg.num_heads * hd),
                                     ('heads', 'head_dim', 'embed')),
        (cfg.num_heads, hd, cfg.d_model), jnp.float32)
    y_BxLxD = token_matmul(out_BxLxHxDh, o_kernel.astype(cfg.compute_dtype),
                           input_ndim=2)
    y_BxLxD = y_BxLxD + lora_delta(self, 'o_kernel', out_BxLxHxDh, 2,
                                   (cfg.d_model,))
    return y_BxLxD, new_cache


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)) — the llama/qwen MLP (hidden `width`)."""

  config: TransformerConfig
  width: int | None = None  # None = config.d_ff

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.config
    dt = cfg.compute_dtype
    width = self.width or cfg.d_ff

    def kernel(name, shape, axes, fan_in):
      return self.param(
          name, nn.with_logical_partitioning(_kernel_init(fan_in), axes),
          shape, jnp.float32).astype(dt)

    gate = kernel('gate_kernel', (cfg.d_model, width), ('embed', 'mlp'), cfg.d_model)
    up = kernel('up_kernel', (cfg.d_model, width), ('embed', 'mlp'), cfg.d_model)
    down = kernel('down_kernel', (width, cfg.d_model), ('mlp', 'embed'), width)
    project = lambda x, w, name: token_matmul(x, w) + lora_delta(
        self, name, x, 1, (w.shape[-1],))
    h_BxLxF = (jax.nn.silu(project(x_BxLxD, gate, 'gate_kernel'))
               * project(x_BxLxD, up, 'up_kernel'))
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ('batch', 'length', 'mlp'))
    return project(h_BxLxF, down, 'down_kernel')
