"""HF safetensors import: golden logits from transformers (tools/make_golden.py)
and clear errors for broken checkpoints."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sleep_jax import sharding
from sleep_jax.checkpoints import hf
from sleep_jax.models import Transformer

DATA = os.path.join(os.path.dirname(__file__), 'testdata')


def _golden_check(name, params, config):
  golden = np.load(os.path.join(DATA, name, 'golden.npz'))
  tokens, lengths = golden['tokens'].astype(np.int32), golden['lengths']
  logits = np.asarray(Transformer(config).apply({'params': params}, tokens))
  for row, n in enumerate(lengths):  # right padding: compare real tokens
    np.testing.assert_allclose(logits[row, :n], golden['logits'][row, :n],
                               atol=1e-4, rtol=0)
  assert lengths.min() < tokens.shape[1]  # the batch really is padded


@pytest.mark.parametrize('name, expect', [
    ('hf_llama', dict(qkv_bias=False, qk_norm=False, tie_embeddings=False,
                      num_kv_heads=2, kind='llama3')),
    ('hf_qwen2', dict(qkv_bias=True, qk_norm=False, tie_embeddings=True,
                      num_kv_heads=2, kind=None)),
    ('hf_qwen3', dict(qkv_bias=False, qk_norm=True, tie_embeddings=False,
                      num_kv_heads=2, kind=None)),
])
def test_logits_match_transformers_reference(name, expect):
  config, params = hf.load_hf_checkpoint(os.path.join(DATA, name))
  kind = expect.pop('kind')
  for key, value in expect.items():
    assert getattr(config, key) == value, key
  assert (config.rope_scaling.kind if config.rope_scaling else None) == kind
  _golden_check(name, params, config)


def test_sharded_load_places_params_and_matches():
  mesh = sharding.make_mesh({'data': 2, 'tensor': 2, 'fsdp': 2})
  config, params = hf.load_hf_checkpoint(os.path.join(DATA, 'hf_qwen3'),
                                         mesh=mesh)
  q = params['layers_0']['attn']['q_kernel']
  assert q.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor', None)
  assert q.addressable_shards[0].data.shape == (8, 2, 8)
  _golden_check('hf_qwen3', params, config)


def _copy(tmp_path, name):
  dst = str(tmp_path / name)
  shutil.copytree(os.path.join(DATA, name), dst)
  return dst


def test_unsupported_architecture_names_file_and_arch(tmp_path):
  path = _copy(tmp_path, 'hf_qwen2')
  cfg_path = os.path.join(path, 'config.json')
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg['architectures'] = ['GPTNeoXForCausalLM']
  with open(cfg_path, 'w') as f:
    json.dump(cfg, f)
  with pytest.raises(hf.CheckpointError) as err:
    hf.load_hf_checkpoint(path)
  assert cfg_path in str(err.value) and 'GPTNeoXForCausalLM' in str(err.value)
  assert 'Qwen2ForCausalLM' in str(err.value)


def test_missing_tensor_names_tensor_and_shape(tmp_path):
  path = _copy(tmp_path, 'hf_qwen2')
  file = os.path.join(path, 'model.safetensors')
  tensors = load_file(file)
  del tensors['model.layers.1.self_attn.k_proj.bias']
  save_file(tensors, file)
  with pytest.raises(hf.CheckpointError) as err:
    hf.load_hf_checkpoint(path)
  msg = str(err.value)
  assert "'model.layers.1.self_attn.k_proj.bias' is missing" in msg
  assert '[8]' in msg and 'model.safetensors' in msg


def test_shape_mismatch_names_file_tensor_and_shapes(tmp_path):
  path = _copy(tmp_path, 'hf_llama')
  file = os.path.join(path, 'model.safetensors')
  tensors = load_file(file)
  tensors['model.layers.0.mlp.up_proj.weight'] = np.zeros((31, 16), np.float32)
  save_file(tensors, file)
  with pytest.raises(hf.CheckpointError) as err:
    hf.load_hf_checkpoint(path)
  msg = str(err.value)
  assert file in msg and "'model.layers.0.mlp.up_proj.weight'" in msg
  assert 'shape [31, 16], expected [32, 16]' in msg
