"""BERT encoder + mean pooling: all-MiniLM-L6-v2 as a frozen semantic reward.

Shape suffixes: B batch, L length, D hidden, H heads, Dh head dim, F MLP
width, N sentences.

Only inference: no dropout, token types are all 0, absolute positions. Every
matmul runs in float32 at HIGHEST precision so embeddings match the float32
reference on any backend (GPUs may otherwise use TF32).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_np
import tokenizers

from sleep_jax import assets

_NEG = -1e30  # finite: a fully padded (batch filler) row gives no NaN
_PRECISION = jax.lax.Precision.HIGHEST
_Dense = functools.partial(nn.Dense, precision=_PRECISION)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_hf(cls, cfg: dict[str, Any]) -> BertConfig:
    """From a HF config.json dict; rejects variants this encoder lacks."""
    act = cfg.get('hidden_act', 'gelu')
    pos = cfg.get('position_embedding_type', 'absolute')
    if act != 'gelu' or pos != 'absolute':
      raise ValueError(f'Unsupported BERT variant: hidden_act={act!r}, '
                       f'position_embedding_type={pos!r}.')
    return cls(cfg['vocab_size'], cfg['hidden_size'], cfg['num_hidden_layers'],
               cfg['num_attention_heads'], cfg['intermediate_size'],
               cfg['max_position_embeddings'], cfg.get('type_vocab_size', 2),
               cfg.get('layer_norm_eps', 1e-12))


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  # Two-pass variance, as in PyTorch; the fast E[x^2]-E[x]^2 loses digits.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False,
                      name=name)


class BertLayer(nn.Module):
  """Post-LayerNorm block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

  config: BertConfig

  @nn.compact
  def __call__(self, x_BxLxD, bias_Bx1x1xL):
    c = self.config
    b, l, d = x_BxLxD.shape
    dh = d // c.num_heads
    split = lambda t: t.reshape(b, l, c.num_heads, dh)
    q_BxLxHxDh = split(_Dense(d, name='query')(x_BxLxD))
    k_BxLxHxDh = split(_Dense(d, name='key')(x_BxLxD))
    v_BxLxHxDh = split(_Dense(d, name='value')(x_BxLxD))
    scores_BxHxLxL = jnp.einsum('blhk,bshk->bhls', q_BxLxHxDh, k_BxLxHxDh,
                                precision=_PRECISION) / math.sqrt(dh)
    probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL + bias_Bx1x1xL, axis=-1)
    ctx_BxLxD = jnp.einsum('bhls,bshk->blhk', probs_BxHxLxL, v_BxLxHxDh,
                           precision=_PRECISION).reshape(b, l, d)
    x_BxLxD = _layer_norm(c, 'attention_ln')(
        x_BxLxD + _Dense(d, name='attention_out')(ctx_BxLxD))
    h_BxLxF = _Dense(c.intermediate_size, name='intermediate')(x_BxLxD)
    h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=False)  # exact erf, as HF "gelu"
    return _layer_norm(c, 'output_ln')(
        x_BxLxD + _Dense(d, name='output')(h_BxLxF))


class BertEncoder(nn.Module):
  """BERT body without pooler: token ids -> last hidden states (float32)."""

  config: BertConfig

  @nn.compact
  def __call__(self, tokens_BxL, mask_BxL):
    """Padded keys (mask 0) get a large negative attention bias."""
    c = self.config
    embed = lambda n, name: nn.Embed(n, c.hidden_size, name=name)
    positions_L = jnp.arange(tokens_BxL.shape[1])
    x_BxLxD = (embed(c.vocab_size, 'word_embeddings')(tokens_BxL)
               + embed(c.max_position, 'position_embeddings')(positions_L)[None]
               + embed(c.type_vocab_size, 'token_type_embeddings')(
                   jnp.zeros_like(tokens_BxL)))
    x_BxLxD = _layer_norm(c, 'embeddings_ln')(x_BxLxD)
    bias_Bx1x1xL = jnp.where(mask_BxL[:, None, None, :] > 0, 0.0, _NEG)
    for i in range(c.num_layers):
      x_BxLxD = BertLayer(c, name=f'layer_{i}')(x_BxLxD, bias_Bx1x1xL)
    return x_BxLxD


def mean_pool(hidden_BxLxD, mask_BxL):
  """Mean over non-pad tokens (sentence-transformers' clamp keeps 0/0 at 0)."""
  m_BxLx1 = mask_BxL[..., None].astype(hidden_BxLxD.dtype)
  return (hidden_BxLxD * m_BxLx1).sum(1) / jnp.maximum(m_BxLx1.sum(1), 1e-9)


# HF module -> flax module; the kind (Embed, LayerNorm, Dense) is in the name.
_EMBEDDINGS = {'embeddings.word_embeddings': 'word_embeddings',
               'embeddings.position_embeddings': 'position_embeddings',
               'embeddings.token_type_embeddings': 'token_type_embeddings',
               'embeddings.LayerNorm': 'embeddings_ln'}
_LAYER = {'attention.self.query': 'query', 'attention.self.key': 'key',
          'attention.self.value': 'value',
          'attention.output.dense': 'attention_out',
          'attention.output.LayerNorm': 'attention_ln',
          'intermediate.dense': 'intermediate', 'output.dense': 'output',
          'output.LayerNorm': 'output_ln'}


def load_bert(model_dir: str) -> tuple[BertConfig, dict]:
  """Reads config.json + model.safetensors into BertEncoder params (numpy)."""
  with open(os.path.join(model_dir, 'config.json')) as f:
    config = BertConfig.from_hf(json.load(f))
  file = os.path.join(model_dir, 'model.safetensors')
  tensors = safetensors_np.load_file(file)

  def get(name):
    for key in (name, 'bert.' + name):  # BertModel vs BertFor* checkpoints
      if key in tensors:
        return np.asarray(tensors[key], np.float32)
    raise ValueError(f'{file}: missing tensor {name!r} (also looked for '
                     f'{"bert." + name!r}).')

  table = dict(_EMBEDDINGS)
  for i in range(config.num_layers):
    table.update({f'encoder.layer.{i}.{hf}': f'layer_{i}/{ours}'
                  for hf, ours in _LAYER.items()})
  flat = {}  # the pooler is not used: sentence embeddings mean-pool instead
  for hf, ours in table.items():
    if hf.endswith('_embeddings'):
      flat[ours + '/embedding'] = get(hf + '.weight')
      continue
    if hf.endswith('LayerNorm'):
      flat[ours + '/scale'] = get(hf + '.weight')
    else:  # torch Linear stores [out, in]; flax Dense wants [in, out]
      flat[ours + '/kernel'] = get(hf + '.weight').T
    flat[ours + '/bias'] = get(hf + '.bias')
  params = traverse_util.unflatten_dict(flat, sep='/')

  def check(kp, want, got):
    if want.shape != got.shape:
      raise ValueError(f'{file}: {jax.tree_util.keystr(kp)} has shape '
                       f'{got.shape}, config.json implies {want.shape}.')

  expected = jax.eval_shape(
      BertEncoder(config).init, jax.random.key(0),
      jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))['params']
  jax.tree_util.tree_map_with_path(check, expected, params)
  return config, params


def _bucket(n: int, cap: int) -> int:
  """Next power of two >= n (min 16, max cap): few distinct compiled shapes."""
  return min(max(16, 1 << max(n - 1, 0).bit_length()), cap)


class SentenceEncoder:
  """Frozen all-MiniLM-L6-v2: texts -> mean-pooled embeddings.

  Embeddings are NOT L2-normalised (the sentence-transformers pipeline adds a
  Normalize module): the raw mean matches the reference hidden states, and
  `cosine` normalises anyway.
  """

  def __init__(self, config: BertConfig, params: dict,
               tokenizer: tokenizers.Tokenizer, max_seq_length: int,
               batch_size: int = 64):
    self.config = config
    self.params = jax.tree.map(jnp.asarray, params)
    self.max_seq_length = max_seq_length
    self.batch_size = batch_size
    # tokenizer.json ships fixed padding/truncation at 128; we bucket ourselves.
    self.tokenizer = tokenizer
    self.tokenizer.no_padding()
    self.tokenizer.enable_truncation(max_seq_length)
    model = BertEncoder(config)
    self._embed = jax.jit(lambda p, t, m: mean_pool(
        model.apply({'params': p}, t, m), m))

  @classmethod
  def from_dir(cls, model_dir: str, batch_size: int = 64) -> SentenceEncoder:
    config, params = load_bert(model_dir)
    max_len = min(512, config.max_position)
    st_config = os.path.join(model_dir, 'sentence_bert_config.json')
    if os.path.exists(st_config):
      with open(st_config) as f:
        max_len = min(json.load(f).get('max_seq_length', max_len),
                      config.max_position)
    tokenizer = tokenizers.Tokenizer.from_file(
        os.path.join(model_dir, 'tokenizer.json'))
    return cls(config, params, tokenizer, max_len, batch_size)

  @classmethod
  def from_asset(cls, batch_size: int = 64) -> SentenceEncoder:
    file = assets.fetch('minilm-l6-v2', verbose=False)
    return cls.from_dir(os.path.dirname(file), batch_size)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """float32[N, D] mean-pooled last hidden states, in input order."""
    ids = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
    out_NxD = np.zeros((len(ids), self.config.hidden_size), np.float32)
    order = np.argsort([len(i) for i in ids], kind='stable')  # less padding
    for start in range(0, len(ids), self.batch_size):
      rows = order[start:start + self.batch_size]
      length = _bucket(max(len(ids[r]) for r in rows), self.max_seq_length)
      tokens_BxL = np.zeros((self.batch_size, length), np.int32)
      mask_BxL = np.zeros((self.batch_size, length), np.int32)
      for j, r in enumerate(rows):
        tokens_BxL[j, :len(ids[r])] = ids[r]
        mask_BxL[j, :len(ids[r])] = 1
      pooled_BxD = self._embed(self.params, tokens_BxL, mask_BxL)
      out_NxD[rows] = np.asarray(pooled_BxD)[:len(rows)]
    return out_NxD

  def cosine(self, a_texts: Sequence[str],
             b_texts: Sequence[str]) -> np.ndarray:
    """float32[N] cosine similarity of a_texts[i] and b_texts[i]."""
    if len(a_texts) != len(b_texts):
      raise ValueError(f'{len(a_texts)} vs {len(b_texts)} texts.')
    emb = self.encode(list(a_texts) + list(b_texts))
    a_NxD, b_NxD = emb[:len(a_texts)], emb[len(a_texts):]
    norms_N = np.linalg.norm(a_NxD, axis=-1) * np.linalg.norm(b_NxD, axis=-1)
    cos_N = (a_NxD * b_NxD).sum(-1) / np.maximum(norms_N, 1e-12)
    return cos_N.astype(np.float32)
