"""Broken checkpoint files: every loader failure is a one-line CheckpointError
that names the file (and the tensor or field) and says what to do."""

import json
import math
import os
import struct

import gguf
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from sleep_jax.checkpoints import hf
from sleep_jax.checkpoints.gguf import load_gguf
from test_gguf import _write_gguf_from_hf
from test_hf import DATA, _copy


def _raises(load, path, *parts):
  """Runs `load`; its CheckpointError must be one line naming `path`."""
  with pytest.raises(hf.CheckpointError) as err:
    load()
  msg = str(err.value)
  assert path in msg and '\n' not in msg, msg
  for part in parts:
    assert part in msg, msg
  return msg


def _both_hf_loaders(path, file, *parts):
  for load in (hf.load_hf_config, hf.load_hf_checkpoint):
    _raises(lambda: load(path), file, *parts)


# --- config.json -----------------------------------------------------------


def _edit(cfg, **changes):
  """cfg with `changes` applied (None deletes the key), as JSON text."""
  cfg = {**cfg, **changes}
  return json.dumps({k: v for k, v in cfg.items() if v is not None})


def _rope_without(cfg, key):
  return {k: v for k, v in cfg['rope_scaling'].items() if k != key}


@pytest.mark.parametrize('make_text, parts', [
    (lambda c: '{"hidden_size": ',
     ['cannot be read as JSON', 'JSONDecodeError']),
    (lambda c: '', ['JSONDecodeError']),
    (lambda c: '[1, 2]', ['JSON list', 'expected an object']),
    (lambda c: _edit(c, hidden_size='big'),
     ["'hidden_size' is 'big'", 'positive integer']),
    (lambda c: json.dumps({**c, 'num_hidden_layers': None}),
     ["'num_hidden_layers' is missing or null"]),
    (lambda c: _edit(c, vocab_size=None), ["'vocab_size' is missing"]),
    (lambda c: _edit(c, num_attention_heads=0),
     ["'num_attention_heads' is 0"]),
    (lambda c: _edit(c, rope_scaling='linear'),
     ["'rope_scaling' is 'linear'", 'expected an object']),
    (lambda c: _edit(c, rope_scaling=_rope_without(c, 'factor')),
     ["'rope_scaling.factor' is missing"]),
    (lambda c: _edit(c, architectures='LlamaForCausalLM'),
     ["'architectures'", 'list of strings']),
    (lambda c: _edit(c, attention_bias='yes'),
     ["'attention_bias' is 'yes'", 'true or false']),
    # Well-typed but inconsistent: TransformerConfig's own check, re-raised.
    (lambda c: _edit(c, num_key_value_heads=3),
     ['cannot be built', 'num_kv_heads=3']),
    (lambda c: _edit(c, rope_scaling={**c['rope_scaling'],
                                      'high_freq_factor': 0.5}),
     ['cannot be built', 'high_freq_factor']),
], ids=['truncated', 'empty', 'list', 'str-int', 'null', 'missing',
        'zero-heads', 'rope-str', 'rope-missing-factor',
        'archs-str', 'bool-str', 'kv-heads', 'rope-factors'])
def test_bad_config_json(tmp_path, make_text, parts):
  path = _copy(tmp_path, 'hf_llama')
  file = os.path.join(path, 'config.json')
  with open(file) as f:
    cfg = json.load(f)
  with open(file, 'w') as f:
    f.write(make_text(cfg))
  _both_hf_loaders(path, file, *parts)


# --- model.safetensors.index.json --------------------------------------------


def _qwen3_index(tmp_path):
  path = _copy(tmp_path, 'hf_qwen3')
  index = os.path.join(path, 'model.safetensors.index.json')
  with open(index) as f:
    return path, index, json.load(f)


@pytest.mark.parametrize('text, parts', [
    ('{"weight_map": {', ['JSONDecodeError']),
    ('{"metadata": {}}', ["no 'weight_map'"]),
    ('{"weight_map": ["model-00001-of-00004.safetensors"]}',
     ["no 'weight_map'"]),
    ('[]', ["no 'weight_map'"]),
], ids=['truncated', 'no-weight-map', 'weight-map-list', 'list'])
def test_bad_index_json(tmp_path, text, parts):
  path, index, _ = _qwen3_index(tmp_path)
  with open(index, 'w') as f:
    f.write(text)
  _raises(lambda: hf.load_hf_checkpoint(path), index, *parts)


def test_index_names_a_missing_shard(tmp_path):
  path, index, _ = _qwen3_index(tmp_path)
  os.remove(os.path.join(path, 'model-00002-of-00004.safetensors'))
  _raises(lambda: hf.load_hf_checkpoint(path), index,
          "['model-00002-of-00004.safetensors']", 'download them')


def test_index_points_a_tensor_at_the_wrong_shard(tmp_path):
  path, index, cfg = _qwen3_index(tmp_path)
  name = 'model.norm.weight'
  first = 'model-00001-of-00004.safetensors'
  assert cfg['weight_map'][name] != first
  cfg['weight_map'][name] = first
  with open(index, 'w') as f:
    json.dump(cfg, f)
  _raises(lambda: hf.load_hf_checkpoint(path), os.path.join(path, first),
          f'cannot read tensor {name!r}')


# --- *.safetensors ------------------------------------------------------------


@pytest.mark.parametrize('corrupt', [
    lambda b: b[:len(b) // 2],
    lambda b: b[:5],
    lambda b: b'',
    lambda b: b'\xff' * 100,
    lambda b: struct.pack('<Q', 12) + b'{"a": 1, xyz' + b[20:],
], ids=['half', 'inside-length', 'empty', 'garbage', 'bad-header-json'])
def test_broken_safetensors_file(tmp_path, corrupt):
  path = _copy(tmp_path, 'hf_llama')
  file = os.path.join(path, 'model.safetensors')
  with open(file, 'rb') as f:
    data = f.read()
  with open(file, 'wb') as f:
    f.write(corrupt(data))
  _raises(lambda: hf.load_hf_checkpoint(path), file,
          'not a readable safetensors file', 'download it again')


def test_truncated_shard_listed_in_index(tmp_path):
  path, _, _ = _qwen3_index(tmp_path)
  shard = os.path.join(path, 'model-00003-of-00004.safetensors')
  os.truncate(shard, os.path.getsize(shard) // 2)
  _raises(lambda: hf.load_hf_checkpoint(path), shard,
          'not a readable safetensors file')


def _raw_tensors(file):
  return {k: ('F32', v.shape, v.tobytes()) for k, v in load_file(file).items()}


def _write_safetensors(file, tensors):
  """safetensors written by hand, so that a tensor can have a dtype numpy
  cannot read ({name: (dtype, shape, bytes)})."""
  header, offset = {}, 0
  for name, (dtype, shape, data) in tensors.items():
    header[name] = {'dtype': dtype, 'shape': list(shape),
                    'data_offsets': [offset, offset + len(data)]}
    offset += len(data)
  text = json.dumps(header).encode()
  with open(file, 'wb') as f:
    f.write(struct.pack('<Q', len(text)) + text)
    f.write(b''.join(data for _, _, data in tensors.values()))


def test_unreadable_dtype_names_file_and_tensor(tmp_path):
  # safetensors reads tensors lazily: float8 (no numpy dtype) fails only when
  # the params are filled.
  path = _copy(tmp_path, 'hf_llama')
  file = os.path.join(path, 'model.safetensors')
  name = 'model.layers.1.mlp.down_proj.weight'
  tensors = _raw_tensors(file)
  shape = tensors[name][1]
  tensors[name] = ('F8_E4M3', shape, bytes(math.prod(shape)))
  _write_safetensors(file, tensors)
  _raises(lambda: hf.load_hf_checkpoint(path), file,
          f'cannot read tensor {name!r}', 'float32/float16/bfloat16')


@pytest.mark.parametrize('shape, expected', [
    ((31, 16), 'shape [31, 16], expected [32, 16]'),
    ((32, 16, 1), 'shape [32, 16, 1], expected [32, 16]'),
])
def test_wrong_shape_names_file_and_tensor(tmp_path, shape, expected):
  path = _copy(tmp_path, 'hf_llama')
  file = os.path.join(path, 'model.safetensors')
  name = 'model.layers.0.mlp.up_proj.weight'
  tensors = _raw_tensors(file)
  tensors[name] = ('F32', shape, bytes(4 * math.prod(shape)))
  _write_safetensors(file, tensors)
  _raises(lambda: hf.load_hf_checkpoint(path), file, repr(name), expected)


# --- GGUF ---------------------------------------------------------------------


@pytest.fixture(scope='module')
def good_gguf(tmp_path_factory):
  """(bytes of a valid llama GGUF, offset where its tensor data starts)."""
  path = str(tmp_path_factory.mktemp('gguf') / 'llama.gguf')
  _write_gguf_from_hf(os.path.join(DATA, 'hf_llama'), path)
  with open(path, 'rb') as f:
    return f.read(), gguf.GGUFReader(path).data_offset


def _load_bytes(tmp_path, data, *parts):
  path = str(tmp_path / 'model.gguf')
  with open(path, 'wb') as f:
    f.write(data)
  return _raises(lambda: load_gguf(path), path, *parts)


# Cut points, as functions of (file size, tensor data offset).
@pytest.mark.parametrize('cut', [
    lambda n, d: 0, lambda n, d: 2, lambda n, d: 6, lambda n, d: 20,
    lambda n, d: 200, lambda n, d: d // 2, lambda n, d: d - 1,
    lambda n, d: d + 10, lambda n, d: (d + n) // 2, lambda n, d: n - 1,
], ids=['empty', 'in-magic', 'in-version', 'in-counts', 'in-metadata',
        'in-tensor-info', 'before-data', 'in-first-tensor', 'mid-data',
        'last-byte'])
def test_truncated_gguf(tmp_path, good_gguf, cut):
  data, data_offset = good_gguf
  _load_bytes(tmp_path, data[:cut(len(data), data_offset)],
              'not a readable GGUF file', 'download it again')


def test_gguf_wrong_magic(tmp_path, good_gguf):
  data, _ = good_gguf
  _load_bytes(tmp_path, b'GGML' + data[4:], 'not a readable GGUF file',
              'magic')


def test_gguf_not_found(tmp_path):
  path = str(tmp_path / 'nope.gguf')
  _raises(lambda: load_gguf(path), path, 'not found')


def test_gguf_missing_metadata_key_is_named(tmp_path, good_gguf):
  data, _ = good_gguf
  key = b'llama.block_count'
  assert data.count(key) == 1
  _load_bytes(tmp_path, data.replace(key, b'llama.block_xxxxx'),
              "metadata key 'llama.block_count' is missing")


def test_gguf_tensor_type_gguf_cannot_dequantize(tmp_path, good_gguf):
  # Retype one F32 tensor as I32 (same size, which gguf reads but does not
  # dequantize). Tensor info: name, n_dims u32, dims u64 each, type u32.
  data, _ = good_gguf
  name = b'output_norm.weight'
  at = data.index(name) + len(name)
  n_dims = struct.unpack_from('<I', data, at)[0]
  type_at = at + 4 + 8 * n_dims
  types = gguf.GGMLQuantizationType
  assert struct.unpack_from('<I', data, type_at)[0] == types.F32
  patched = bytearray(data)
  struct.pack_into('<I', patched, type_at, types.I32)
  _load_bytes(tmp_path, bytes(patched),
              "cannot read tensor 'output_norm.weight'", 'NotImplementedError')


def test_weights_for_more_layers_than_config_json_are_refused(tmp_path):
  """config.json saying fewer layers than the weights hold would load a
  truncated model without a word: the unread tensors are named instead."""
  path = _copy(tmp_path, 'hf_llama')
  config_path = os.path.join(path, 'config.json')
  with open(config_path) as f:
    config = json.load(f)
  config['num_hidden_layers'] -= 1
  with open(config_path, 'w') as f:
    json.dump(config, f)
  with pytest.raises(hf.CheckpointError) as error:
    hf.load_hf_checkpoint(path)
  message = str(error.value)
  assert '\n' not in message and 'map onto no parameter' in message
  assert f'model.layers.{config["num_hidden_layers"]}.' in message


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
  path = _copy(tmp_path, 'hf_llama')
  file = os.path.join(path, 'model.safetensors')
  tensors = load_file(file)
  tensors['model.norm.weight'][:] = float('nan')
  save_file(tensors, file)
  with pytest.raises(hf.CheckpointError,
                     match=r"'model.norm.weight' holds NaN or inf"):
    hf.load_hf_checkpoint(path)


def test_a_file_for_a_directory_and_the_reverse_say_which_loader(tmp_path):
  path = _copy(tmp_path, 'hf_llama')
  with pytest.raises(hf.CheckpointError, match='is a file: pass the directory'):
    hf.load_hf_checkpoint(os.path.join(path, 'model.safetensors'))
  gguf_path = str(tmp_path / 'model.gguf')
  _write_gguf_from_hf(os.path.join(DATA, 'hf_llama'), gguf_path)
  with pytest.raises(hf.CheckpointError, match='load_gguf'):
    hf.load_hf_checkpoint(gguf_path)
  with pytest.raises(hf.CheckpointError, match='is a directory.*'
                     'load_hf_checkpoint'):
    load_gguf(path)
