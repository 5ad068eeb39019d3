"""Device meshes, logical-axis rules and born-sharded initialisation.

The mesh has three axes, `data`, `fsdp` and `tensor`. Model code names its
axes logically ('batch', 'embed', 'mlp', 'heads', ...); a rules table (in the
experiment config, `config.sharding.rules`) maps logical names to mesh axes.
Params are never materialised unsharded: `init_sharded` traces the init with
`jax.eval_shape`, turns the logical names into `NamedSharding`s and runs the
init under `jax.jit(..., out_shardings=...)`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

# A sensible default: batch over data+fsdp, weights' embed dim over fsdp
# (ZeRO-3 style), heads/MLP/vocab over tensor (Megatron style), CMS experts
# over tensor (expert parallel).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('norm', None),
    ('expert', 'tensor'),
    ('rank', None),
)

_distributed_initialized = False


# How long a process waits for a lost peer before it fails (seconds): JAX's
# default (100 s heartbeat, 300 s shutdown) would leave the survivors of a
# `kill -9` hanging for minutes.
HEARTBEAT_TIMEOUT_S = 10
SHUTDOWN_TIMEOUT_S = 30


def heartbeat_timeout_s() -> int:
  """Seconds of silence after which a peer counts as lost
  (SLEEP_JAX_HEARTBEAT_TIMEOUT_S overrides the default)."""
  return int(os.environ.get('SLEEP_JAX_HEARTBEAT_TIMEOUT_S',
                            HEARTBEAT_TIMEOUT_S))


def distributed_env() -> dict[str, Any]:
  """The `jax.distributed.initialize` arguments the environment gives: the
  coordinator address, and the process count and id when a launcher sets
  JAX_NUM_PROCESSES / JAX_PROCESS_ID (`launch.local`); a Cloud TPU pod or
  SLURM leaves those unset and JAX finds them."""
  kwargs = {'heartbeat_timeout_seconds': heartbeat_timeout_s(),
            'shutdown_timeout_seconds': SHUTDOWN_TIMEOUT_S}
  for key, env in (('coordinator_address', 'JAX_COORDINATOR_ADDRESS'),
                   ('num_processes', 'JAX_NUM_PROCESSES'),
                   ('process_id', 'JAX_PROCESS_ID')):
    value = os.environ.get(env)
    if value:
      kwargs[key] = value if key == 'coordinator_address' else int(value)
  return kwargs


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` once when running multi-process.

  Cloud TPU pods (and any launcher that sets JAX_COORDINATOR_ADDRESS,
  TPU_WORKER_HOSTNAMES or SLURM variables) need it before the first JAX
  call; on one host it is a no-op. SLEEP_JAX_DISTRIBUTED=1 forces it (the
  launchers set it), =0 disables it. Every entry point calls this first.
  """
  global _distributed_initialized
  if _distributed_initialized:
    return
  forced = os.environ.get('SLEEP_JAX_DISTRIBUTED')
  if forced is not None:
    multi = forced == '1'
  else:
    multi = (os.environ.get('JAX_COORDINATOR_ADDRESS')
             or os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0
             or int(os.environ.get('SLURM_NTASKS', '1')) > 1)
  if multi:
    jax.distributed.initialize(**distributed_env())
    logging.info('jax.distributed initialised: process %d of %d',
                 jax.process_index(), jax.process_count())
  _distributed_initialized = True


def resolve_mesh_shape(mesh_shape: Mapping[str, int], num_devices: int,
                       key: str = 'mesh') -> tuple[int, int, int]:
  """Fills the (at most one) -1 axis and checks the product is num_devices."""
  unknown = sorted(set(mesh_shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'{key} has unknown axes {unknown}; valid axes: '
                     f'{list(MESH_AXES)}.')
  sizes = [int(mesh_shape.get(a, 1)) for a in MESH_AXES]
  fills = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(fills) > 1:
    raise ValueError(f'{key}: only one axis may be -1; got {fills} = -1.')
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f'{key}.{a}={s} is invalid: use a positive size or -1 '
                       '(fill with the remaining devices).')
  known = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % known:
      raise ValueError(
          f'{key}={dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} '
          f'devices: the fixed axes multiply to {known}, which does not divide '
          f'{num_devices}.')
    sizes[MESH_AXES.index(fills[0])] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f'{key}={dict(zip(MESH_AXES, sizes))} needs {known} devices but '
        f'{num_devices} are available; make the sizes multiply to '
        f'{num_devices}, or set one axis to -1.')
  return tuple(sizes)


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[Any] | None = None,
              key: str = 'mesh') -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1 (fill)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices), key)
  mesh = Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
  # Tensor parallelism exchanges activations at every layer: across hosts
  # that traffic would go over the network. Refused rather than slow.
  for row in mesh.devices.reshape(-1, shape[-1]):
    if len({d.process_index for d in row}) > 1:
      local = sum(d.process_index == row[0].process_index for d in devices)
      raise ValueError(
          f'{key}.tensor={shape[-1]} spans processes (each has {local} '
          f'device{"s" if local != 1 else ""}): keep the tensor axis within '
          f'one host ({key}.tensor dividing {local}) and put the rest on data '
          'or fsdp.')
  return mesh


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
  """Normalises a rules table from a config (lists become tuples)."""
  out = []
  for name, target in rules:
    if isinstance(target, list):
      target = tuple(target)
    for axis in (target if isinstance(target, tuple) else (target,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f'sharding rule {name!r} -> {target!r}: {axis!r} is '
                         f'not a mesh axis; valid: {list(MESH_AXES)} or None.')
    out.append((name, target))
  return tuple(out)


def logical_shardings(boxed_abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a tree whose leaves carry logical axis names."""
  specs = nn.get_partition_spec(boxed_abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def abstract_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules, *args):
  """(ShapeDtypeStructs with shardings, shardings) of `init_fn(*args)`.

  Traces only: nothing is allocated or compiled. Use it as a restore target.
  """
  boxed = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules, *args):
  """Runs `init_fn(*args)` so every output leaf is born in its sharding.

  `init_fn` returns a tree of `nn.LogicallyPartitioned` boxes (e.g. a linen
  init, or a train state built from one). Returns (unboxed tree, shardings).
  """
  _, shardings = abstract_sharded(init_fn, mesh, rules, *args)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    tree = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)),
                   out_shardings=shardings)(*args)
  return tree, shardings


def check_divisible(boxed_abstract_tree, mesh_sizes: Mapping[str, int], rules,
                    key: str = 'sharding.rules') -> None:
  """Fails (before any compilation) if a param dim cannot split evenly.

  `mesh_sizes` maps mesh axis -> size (e.g. from `resolve_mesh_shape`).
  """
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed_abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    if not isinstance(leaf, nn.Partitioned):
      continue
    spec = nn.logical_to_mesh_axes(leaf.names, rules)
    for dim, logical, axes in zip(leaf.value.shape, leaf.names, spec):
      axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
      ways = math.prod(mesh_sizes[a] for a in axes)
      if dim % ways:
        raise ValueError(
            f'Param {jax.tree_util.keystr(path)} has {logical}={dim}, which '
            f'does not split over mesh axes {list(axes)} of total size '
            f'{ways}. Change the mesh (config.mesh), map {logical!r} to '
            f'fewer axes in {key}, or pick a size divisible by {ways}.')


def put(tree, shardings, *, may_alias: bool | None = None):
  """`jax.device_put(tree, shardings)` that also works when the shardings
  span several processes (`shardings` may be a prefix of `tree`).

  There, JAX cannot move an array from one process's device onto devices
  of others (no cross-host transfer on CPU or GPU): every process holds the
  same values (same seeds, same data), so each device's block is cut from
  its own host copy. An array that already spans the processes is
  resharded by a compiled copy.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings, may_alias=may_alias)

  def one(x, sharding):
    if sharding.is_fully_addressable:   # this process's devices only
      return jax.device_put(x, sharding, may_alias=may_alias)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if may_alias is not False and x.sharding.is_equivalent_to(sharding,
                                                                x.ndim):
        return x
      return jax.jit(jnp.copy, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda index: host[index])

  def put_subtree(sharding, subtree):
    return jax.tree.map(lambda x: one(x, sharding), subtree)

  if isinstance(shardings, jax.sharding.Sharding):
    return put_subtree(shardings, tree)
  return jax.tree.map(put_subtree, shardings, tree,
                      is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def place_like(tree, reference):
  """`tree` with each array on the sharding of its twin in `reference`.

  Keeps a tree a function rebuilt (growth, reset) where the compiled steps
  expect it: no resharding inside them, no recompilation.
  """
  return jax.tree.map(
      lambda x, ref: put(x, ref.sharding)
      if isinstance(ref, jax.Array) else x, tree, reference)


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] input array: batch over the 'batch' rule."""
  spec = nn.logical_to_mesh_axes(('batch',) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_inputs(args, shardings):
  """`args` with each host (numpy) array made a global jax.Array laid out as
  its sharding says. On several processes jit takes no host array with a
  sharding that spans them; every process holds the same host values here
  (its randomness is seeded alike), so each device's block is cut from
  them."""
  def put(sharding, subtree):
    def one(x):
      if isinstance(x, (np.ndarray, np.generic)):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding,
                                            lambda index: x[index])
      return x
    return jax.tree.map(one, subtree)
  return jax.tree.map(put, tuple(shardings), tuple(args),
                      is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def compile_step(step_fn: Callable[..., Any], mesh: Mesh, rules, *,
                 in_shardings, out_shardings, donate_argnums=(0,)):
  """`jax.jit(step_fn)` with explicit shardings, called under mesh + rules.

  The one wrapper behind every compiled step (train, wake, seeding). Returns
  `step(*args)`; `step.jitted` is the jitted function (for compile counting
  with `_cache_size()`).
  """
  jitted = jax.jit(step_fn, in_shardings=in_shardings,
                   out_shardings=out_shardings, donate_argnums=donate_argnums)

  def step(*args):
    if jax.process_count() > 1:
      args = global_inputs(args, in_shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(*args)

  step.jitted = jitted
  return step
