"""Import llama-architecture GGUF files (llama.cpp), dequantised with `gguf`.

`load_gguf(path) -> (TransformerConfig, params, tokenizer)`.

Two llama.cpp conventions are undone here:
* tensor names (`blk.N.attn_q.weight`, ...) are mapped onto HF names and
  then placed like an HF checkpoint (sleep_jax.checkpoints.hf);
* llama.cpp's converter permutes the rows of q and k so that RoPE pairs are
  interleaved (i, i+1); we use the HF "rotate half" pairing (i, i + Dh/2),
  so the permutation is inverted per head.
The tokenizer (BPE vocabulary, merges, special tokens) and the chat template
come from the file's metadata.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from sleep_jax import sharding as sharding_lib
from sleep_jax.checkpoints.hf import (CheckpointError, as_checkpoint_error,
                                      place_params)
from sleep_jax.data.tokenizers import HFTokenizer
from sleep_jax.models import TransformerConfig

_GGUF_TO_HF = {
    'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm',
    'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
    'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj',
}


_REQUIRED = object()


def _field(reader, path: str, key: str, default: Any = _REQUIRED):
  field = reader.fields.get(key)
  if field is None:
    if default is _REQUIRED:
      raise CheckpointError(
          f"{path}: metadata key {key!r} is missing; llama.cpp's "
          'convert_hf_to_gguf.py writes it: convert the model again.')
    return default
  with as_checkpoint_error(path, f'metadata key {key!r} is unreadable'):
    return field.contents()


def _hf_name(gguf_name: str) -> str | None:
  if gguf_name == 'token_embd.weight':
    return 'model.embed_tokens.weight'
  if gguf_name == 'output_norm.weight':
    return 'model.norm.weight'
  if gguf_name == 'output.weight':
    return 'lm_head.weight'
  parts = gguf_name.split('.')
  if parts[0] == 'blk' and len(parts) == 4 and parts[2] in _GGUF_TO_HF:
    return f'model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.{parts[3]}'
  return None


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverts llama.cpp's q/k row permutation ([N*Dh, D] or [N*Dh])."""
  rows = w.shape[0]
  half = rows // num_heads // 2
  return (w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def _config(reader, path: str) -> TransformerConfig:
  arch = _field(reader, path, 'general.architecture', None)
  if arch != 'llama':
    raise CheckpointError(f'{path}: general.architecture={arch!r} is not '
                          'supported; supported: "llama".')
  names = {t.name for t in reader.tensors}
  if 'rope_freqs.weight' in names:
    raise CheckpointError(
        f'{path}: has rope_freqs.weight (per-frequency RoPE scaling, as in '
        'Llama 3.1 GGUFs), which is not supported yet; load the HF '
        'safetensors checkpoint instead.')
  key = lambda k, default=_REQUIRED: _field(reader, path, f'llama.{k}',
                                            default)
  # A corrupt file may hold any type where a count belongs, and
  # TransformerConfig checks the values.
  with as_checkpoint_error(path, 'has llama metadata that describes no valid '
                           'model', 'convert the model again'):
    heads = int(key('attention.head_count'))
    d_model = int(key('embedding_length'))
    vocab = key('vocab_size', None) or len(
        _field(reader, path, 'tokenizer.ggml.tokens'))
    head_dim = key('attention.key_length', None)
    if head_dim is not None and int(head_dim) == d_model // heads:
      head_dim = None
    return TransformerConfig(
        vocab_size=int(vocab), d_model=d_model,
        num_layers=int(key('block_count')), num_heads=heads,
        num_kv_heads=int(key('attention.head_count_kv', None) or heads),
        d_ff=int(key('feed_forward_length')),
        head_dim=None if head_dim is None else int(head_dim),
        rope_theta=float(key('rope.freq_base', None) or 10_000.0),
        norm_eps=float(key('attention.layer_norm_rms_epsilon')),
        tie_embeddings='output.weight' not in names,
        max_len=int(key('context_length', None) or 2048))


def _tokenizer(reader, path: str) -> HFTokenizer:
  field = lambda k, default=_REQUIRED: _field(reader, path, f'tokenizer.{k}',
                                              default)
  model = field('ggml.model', None)
  if model != 'gpt2':
    raise CheckpointError(f'{path}: tokenizer.ggml.model={model!r} is not '
                          'supported; supported: "gpt2" (byte-level BPE).')
  bos = field('ggml.bos_token_id', None)
  with as_checkpoint_error(path, 'has a tokenizer that cannot be built',
                           'convert the model again'):
    return HFTokenizer.from_gguf_bpe(
        field('ggml.tokens'), field('ggml.merges'), field('ggml.token_type'),
        bos_id=None if bos is None else int(bos),
        eos_id=int(field('ggml.eos_token_id')),
        pad_id=field('ggml.padding_token_id', None),
        chat_template=field('chat_template', None))


def load_gguf(path: str, *, mesh: jax.sharding.Mesh | None = None,
              rules=sharding_lib.DEFAULT_RULES):
  """Loads a llama-architecture GGUF file.

  Returns:
    (TransformerConfig, params float32, HFTokenizer).
  """
  from gguf import GGUFReader
  from gguf.quants import dequantize

  if os.path.isdir(path):
    raise CheckpointError(f'{path} is a directory: load_gguf needs the path '
                          'of a .gguf file (a Hugging Face checkpoint '
                          'directory loads with load_hf_checkpoint).')
  if not os.path.isfile(path):
    raise CheckpointError(f'{path} not found: load_gguf needs the path of a '
                          '.gguf file.')
  with as_checkpoint_error(path, 'is not a readable GGUF file'):
    reader = GGUFReader(path)
  config = _config(reader, path)
  tensors = {}
  for t in reader.tensors:
    name = _hf_name(t.name)
    if name is None:
      continue
    # gguf cannot dequantize every type it reads (Q8_1, Q8_K, integers, F64),
    # and a head count that does not divide the rows breaks the unpermute.
    with as_checkpoint_error(
        path, f'cannot read tensor {t.name!r}',
        'convert the model again with llama.cpp, to a type gguf dequantizes '
        '(F32, F16, BF16, Q8_0, Q4_K, ...)'):
      # GGUF lists dims fastest-first; dequantize returns the numpy (HF) order.
      w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
      w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
      if name.endswith('q_proj.weight'):
        w = unpermute_rope_rows(w, config.num_heads)
      elif name.endswith('k_proj.weight'):
        w = unpermute_rope_rows(w, config.num_kv_heads)
    tensors[name] = w

  def lookup(name: str):
    w = tensors.get(name)
    if w is None:
      return None, [path]
    return path, (w, w.shape)

  params = place_params(config, lookup, where=path, mesh=mesh, rules=rules)
  return config, params, _tokenizer(reader, path)
