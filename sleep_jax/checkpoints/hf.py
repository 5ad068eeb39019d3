"""Import Hugging Face safetensors checkpoints (Llama, Qwen2, Qwen3).

`load_hf_checkpoint(path)` reads `config.json` (the published layout with
`rope_theta` / `rope_scaling`, or the transformers-5 layout with
`rope_parameters`) and the `*.safetensors` shards (with or without
`model.safetensors.index.json`), and returns `(TransformerConfig, params)`.

Tensors are read with safetensors' numpy API one slice at a time: with a
mesh, every device shard is read straight from the file region it needs
(`jax.make_array_from_callback`), so no host ever holds a full copy of the
model. bfloat16 files load through ml_dtypes (imported by JAX).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16' for safetensors)
import numpy as np
from safetensors import safe_open

from sleep_jax import sharding as sharding_lib
from sleep_jax.models import RopeScaling, Transformer, TransformerConfig

SUPPORTED_ARCHITECTURES = {
    'LlamaForCausalLM': 'llama',
    'Qwen2ForCausalLM': 'qwen2',
    'Qwen3ForCausalLM': 'qwen3',
}


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded; the message names file and tensor."""


REDOWNLOAD = 'the file is probably truncated or corrupt: download it again'


@contextlib.contextmanager
def as_checkpoint_error(path: str, what: str, fix: str = REDOWNLOAD):
  """Re-raises a reader's error inside the block as a one-line CheckpointError.

  Users see which file is broken and what to do, instead of a library's
  traceback that names neither. Any Exception: on a malformed file the readers
  raise anything from IndexError to tokenizers' bare Exception; the original
  stays chained for debugging.
  """
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    detail = ' '.join(str(e).split())
    raise CheckpointError(
        f'{path}: {what} ({type(e).__name__}: {detail}); {fix}.') from e


# --- config.json -> TransformerConfig ---------------------------------------

_REQUIRED = object()
# `type(v) is int`: bool is an int subclass, but `true` is no layer count.
_KINDS: dict[type, tuple[str, Callable[[Any], bool]]] = {
    int: ('a positive integer', lambda v: type(v) is int and v > 0),
    float: ('a positive number', lambda v: type(v) in (int, float) and v > 0),
    bool: ('true or false', lambda v: type(v) is bool),
    str: ('a string', lambda v: isinstance(v, str)),
    list: ('a list of strings', lambda v: isinstance(v, list) and all(
        isinstance(x, str) for x in v)),
    dict: ('an object', lambda v: isinstance(v, dict)),
}


@dataclasses.dataclass(frozen=True)
class _Fields:
  """A JSON object of config.json whose typed reads name file and field."""

  obj: dict[str, Any]
  path: str
  prefix: str = ''

  def get(self, key: str, kind: type, default: Any = _REQUIRED) -> Any:
    name = self.prefix + key
    value = self.obj.get(key)
    if value is None:  # transformers writes null for "not set"
      if default is _REQUIRED:
        raise CheckpointError(
            f'{self.path}: required field {name!r} is missing or null; '
            "restore it from the model's published config.json.")
      return default
    expected, ok = _KINDS[kind]
    if not ok(value):
      raise CheckpointError(
          f'{self.path}: field {name!r} is {value!r:.80}, expected {expected}; '
          "restore it from the model's published config.json.")
    if kind is dict:
      return _Fields(value, self.path, name + '.')
    return float(value) if kind is float else value


def _rope(cfg: _Fields) -> tuple[float, RopeScaling | None]:
  params = cfg.get('rope_parameters', dict, None)  # transformers >= 5
  theta = cfg.get('rope_theta', float, 10_000.0)
  if params is not None:
    theta = params.get('rope_theta', float, theta)
  scaling = cfg.get('rope_scaling', dict, None) or params
  kind = None if scaling is None else (scaling.get('rope_type', str, None)
                                       or scaling.get('type', str, None))
  if kind in (None, 'default'):
    return theta, None
  if kind != 'llama3':
    raise CheckpointError(
        f'{cfg.path}: rope scaling type {kind!r} is not supported; '
        'supported: "llama3" or none.')
  return theta, RopeScaling(
      factor=scaling.get('factor', float),
      low_freq_factor=scaling.get('low_freq_factor', float),
      high_freq_factor=scaling.get('high_freq_factor', float),
      original_max_position=scaling.get('original_max_position_embeddings',
                                        int))


def config_from_hf(hf: dict[str, Any], config_path: str = 'config.json'
                   ) -> TransformerConfig:
  """Maps a transformers `config.json` dict onto a TransformerConfig."""
  if not isinstance(hf, dict):
    raise CheckpointError(
        f'{config_path}: holds a JSON {type(hf).__name__}, expected an object '
        'of transformers config fields; restore the published config.json.')
  cfg = _Fields(hf, config_path)
  archs = cfg.get('architectures', list, [])
  family = next((SUPPORTED_ARCHITECTURES[a] for a in archs
                 if a in SUPPORTED_ARCHITECTURES), None)
  if family is None:
    raise CheckpointError(
        f'{config_path}: architectures={archs} (model_type='
        f'{hf.get("model_type")!r}) is not supported; supported: '
        f'{sorted(SUPPORTED_ARCHITECTURES)}.')
  # RopeScaling and TransformerConfig check the values themselves.
  with as_checkpoint_error(config_path, 'describes a model that cannot be '
                           'built', 'correct the fields it names'):
    theta, scaling = _rope(cfg)
    d_model = cfg.get('hidden_size', int)
    heads = cfg.get('num_attention_heads', int)
    head_dim = cfg.get('head_dim', int, None)
    if head_dim == d_model // heads:
      head_dim = None
    return TransformerConfig(
        vocab_size=cfg.get('vocab_size', int), d_model=d_model,
        num_layers=cfg.get('num_hidden_layers', int), num_heads=heads,
        num_kv_heads=cfg.get('num_key_value_heads', int, heads),
        d_ff=cfg.get('intermediate_size', int), head_dim=head_dim,
        rope_theta=theta, rope_scaling=scaling,
        norm_eps=cfg.get('rms_norm_eps', float, 1e-6),
        qkv_bias=(family == 'qwen2') or cfg.get('attention_bias', bool, False),
        qk_norm=(family == 'qwen3'),
        tie_embeddings=cfg.get('tie_word_embeddings', bool, family == 'qwen2'),
        max_len=cfg.get('max_position_embeddings', int, 2048))


# --- where each of our params comes from ---------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
  """HF tensor `name` and how it maps onto our layout.

  kind: 'copy' (same layout), 'transpose' (ours = W.T for a [out, in]
  Linear), 'in_heads' (W [N*Dh, D] -> ours [D, N, Dh]), 'out_heads'
  (W [D, N*Dh] -> ours [N, Dh, D]), 'bias_heads' ([N*Dh] -> [N, Dh]).
  """

  name: str
  kind: str


def _sources(config: TransformerConfig) -> dict[tuple[str, ...], _Source]:
  out = {('embed', 'embedding'): _Source('model.embed_tokens.weight', 'copy'),
         ('final_norm', 'scale'): _Source('model.norm.weight', 'copy')}
  if not config.tie_embeddings:
    out[('lm_head',)] = _Source('lm_head.weight', 'transpose')
  for i in range(config.num_layers):
    hf, ours = f'model.layers.{i}', f'layers_{i}'
    out[(ours, 'attn_norm', 'scale')] = _Source(f'{hf}.input_layernorm.weight', 'copy')
    out[(ours, 'mlp_norm', 'scale')] = _Source(
        f'{hf}.post_attention_layernorm.weight', 'copy')
    for p in ('q', 'k', 'v'):
      out[(ours, 'attn', f'{p}_kernel')] = _Source(
          f'{hf}.self_attn.{p}_proj.weight', 'in_heads')
      if config.qkv_bias:
        out[(ours, 'attn', f'{p}_bias')] = _Source(
            f'{hf}.self_attn.{p}_proj.bias', 'bias_heads')
    out[(ours, 'attn', 'o_kernel')] = _Source(f'{hf}.self_attn.o_proj.weight',
                                              'out_heads')
    if config.qk_norm:
      for p in ('q', 'k'):
        out[(ours, 'attn', f'{p}_norm', 'scale')] = _Source(
            f'{hf}.self_attn.{p}_norm.weight', 'copy')
    for p in ('gate', 'up', 'down'):
      out[(ours, 'mlp', f'{p}_kernel')] = _Source(f'{hf}.mlp.{p}_proj.weight',
                                                  'transpose')
  return out


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape that maps onto our `shape`."""
  if kind == 'copy':
    return shape
  if kind == 'transpose':
    return shape[::-1]
  if kind == 'in_heads':
    d, n, dh = shape
    return (n * dh, d)
  if kind == 'out_heads':
    n, dh, d = shape
    return (d, n * dh)
  n, dh = shape  # bias_heads
  return (n * dh,)


def _read_block(hf_slice, kind: str, shape, index) -> np.ndarray:
  """Reads our block `index` (tuple of slices) from an HF safetensors slice."""
  ranges = [s.indices(n)[:2] for s, n in zip(index, shape)]
  sl = lambda r: slice(*r)
  if kind == 'copy':
    return hf_slice[tuple(sl(r) for r in ranges)]
  if kind == 'transpose':
    return hf_slice[sl(ranges[1]), sl(ranges[0])].T
  if kind == 'in_heads':
    (d0, d1), (h0, h1), (e0, e1) = ranges
    dh = shape[2]
    block = hf_slice[h0 * dh:h1 * dh, d0:d1]  # [nh*Dh, nd]
    return block.reshape(h1 - h0, dh, d1 - d0)[:, e0:e1].transpose(2, 0, 1)
  if kind == 'out_heads':
    (h0, h1), (e0, e1), (d0, d1) = ranges
    dh = shape[1]
    block = hf_slice[d0:d1, h0 * dh:h1 * dh]  # [nd, nh*Dh]
    return block.reshape(d1 - d0, h1 - h0, dh)[:, :, e0:e1].transpose(1, 2, 0)
  (h0, h1), (e0, e1) = ranges  # bias_heads
  dh = shape[1]
  return hf_slice[h0 * dh:h1 * dh].reshape(h1 - h0, dh)[:, e0:e1]


# --- files ----------------------------------------------------------------------


def _open_safetensors(file: str):
  with as_checkpoint_error(file, 'is not a readable safetensors file'):
    return safe_open(file, framework='np')


def _read_json(file: str) -> Any:
  with as_checkpoint_error(file, 'cannot be read as JSON',
                           'restore the published file'), open(file) as f:
    return json.load(f)


def _weight_map(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file, from the index or by listing shards."""
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(index):
    mapping = _read_json(index)
    mapping = mapping.get('weight_map') if isinstance(mapping, dict) else None
    if not (isinstance(mapping, dict) and
            all(isinstance(v, str) for v in mapping.values())):
      raise CheckpointError(
          f"{index}: has no 'weight_map' object of tensor name -> shard file; "
          'restore the published file.')
    missing = sorted({v for v in mapping.values()
                      if not os.path.isfile(os.path.join(path, v))})
    if missing:
      raise CheckpointError(
          f'{index}: weight_map names shard files missing from {path}: '
          f'{missing}; download them.')
    return {k: os.path.join(path, v) for k, v in mapping.items()}
  files = sorted(glob.glob(os.path.join(path, '*.safetensors')))
  if not files:
    raise CheckpointError(f'{path}: no *.safetensors files found.')
  mapping = {}
  for file in files:
    with _open_safetensors(file) as f:
      for key in f.keys():
        mapping[key] = file
  return mapping


def load_hf_config(path: str) -> TransformerConfig:
  if os.path.isfile(path):
    raise CheckpointError(
        f'{path} is a file: pass the directory holding config.json and '
        '*.safetensors' + (' (a .gguf file loads with sleep_jax.checkpoints.'
                           'gguf.load_gguf)' if path.endswith('.gguf') else '')
        + '.')
  config_path = os.path.join(path, 'config.json')
  if not os.path.exists(config_path):
    raise CheckpointError(f'{config_path} not found: a Hugging Face checkpoint '
                          'directory needs config.json next to *.safetensors.')
  return config_from_hf(_read_json(config_path), config_path)


def load_hf_checkpoint(path: str, *, mesh: jax.sharding.Mesh | None = None,
                       rules=sharding_lib.DEFAULT_RULES,
                       config_overrides: dict[str, Any] | None = None):
  """Loads a Llama / Qwen2 / Qwen3 HF checkpoint directory.

  Args:
    path: directory with config.json and *.safetensors.
    mesh: if given, each param is placed directly into its sharding (from
      the model's logical axes and `rules`); else onto the default device.
    rules: logical-axis rules used with `mesh`.
    config_overrides: TransformerConfig fields to change (e.g. dtype).

  Returns:
    (TransformerConfig, params) — params float32, as `Transformer.apply` wants.

  Raises:
    CheckpointError: unsupported architecture, missing tensor or shape
      mismatch; the message names the file, the tensor and the shapes.
  """
  config = load_hf_config(path)
  if config_overrides:
    config = dataclasses.replace(config, **config_overrides)
  weight_map = _weight_map(path)
  open_files: dict[str, Any] = {}
  used = set()

  def lookup(name: str):
    used.add(name)
    file = weight_map.get(name)
    if file is None:
      return None, sorted(set(os.path.basename(f) for f in weight_map.values()))
    if file not in open_files:
      open_files[file] = _open_safetensors(file)
    with as_checkpoint_error(file, f'cannot read tensor {name!r}'):
      sl = open_files[file].get_slice(name)
      return file, (sl, tuple(sl.get_shape()))

  try:
    params = place_params(config, lookup, where=path, mesh=mesh, rules=rules)
  finally:
    open_files.clear()
  # Tensors no parameter reads mean config.json describes a smaller model
  # than the weights hold (e.g. fewer layers): refuse, not truncate.
  unused = sorted(n for n in set(weight_map) - used
                  if not n.endswith('rotary_emb.inv_freq') and not (
                      n == 'lm_head.weight' and config.tie_embeddings))
  if unused:
    raise CheckpointError(
        f'{path}: {len(unused)} tensors map onto no parameter of the model '
        f'config.json describes (e.g. {unused[:3]}); a size in config.json '
        '(num_hidden_layers, ...) does not match the weights.')
  return config, params


def place_params(config: TransformerConfig, lookup, *, where: str,
                 mesh: jax.sharding.Mesh | None = None,
                 rules=sharding_lib.DEFAULT_RULES):
  """Builds our params from HF-named tensors, each leaf born in its sharding.

  `lookup(hf_name)` returns (file, (sliceable, shape)) — anything indexable
  with a tuple of slices, such as a safetensors slice or a numpy array — or
  (None, files_searched) when the tensor is absent.
  """
  boxed = jax.eval_shape(Transformer(config).init, jax.random.key(0),
                         jnp.ones((1, 1), jnp.int32))['params']
  abstract = nn.meta.unbox(boxed)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  else:
    shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  sources = _sources(config)

  def load_leaf(key_path, leaf, sharding):
    key = tuple(k.key for k in key_path)
    source = sources.get(key)
    if source is None:
      raise CheckpointError(f'No checkpoint tensor maps onto param {key}.')
    expected = _hf_shape(source.kind, leaf.shape)
    file, found = lookup(source.name)
    if file is None:
      raise CheckpointError(
          f'{where}: tensor {source.name!r} is missing (expected shape '
          f'{list(expected)}); searched {found}.')
    sliceable, shape = found
    if shape != expected:
      raise CheckpointError(
          f'{file}: tensor {source.name!r} has shape {list(shape)}, expected '
          f'{list(expected)} for the config of {where}.')
    def read(idx) -> np.ndarray:
      # Reads are lazy: a dtype numpy lacks (float8) fails only here.
      with as_checkpoint_error(
          file, f'cannot read tensor {source.name!r}',
          'convert it to float32/float16/bfloat16, or download it again if '
          'it is corrupt'):
        block = np.asarray(_read_block(sliceable, source.kind, leaf.shape,
                                       idx), np.float32)
      if not np.isfinite(block).all():
        raise CheckpointError(
            f'{file}: tensor {source.name!r} holds NaN or inf values; the '
            'file is damaged or was saved from a diverged run.')
      return block

    return jax.make_array_from_callback(leaf.shape, sharding, read)

  return jax.tree_util.tree_map_with_path(load_leaf, abstract, shardings)
