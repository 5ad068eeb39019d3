"""Parameter growth and reset for CMS levels, and trainable-parameter masks.

docs/design.md §3. Growth unlocks a pre-allocated low-rank expert slot of a
level: the slot's `active` bit is set (model state, 'cms' collection), `A`
gets a small random init, `B` and the slot's router row start at zero. With
`B = 0` the new expert adds exactly zero, so the model's function is
unchanged at the moment of growth. Shapes never change, so no jitted step
recompiles.

`state` below is the model state: the non-param variable collections,
`{'cms': {'level_0': bool[E_max], ...}}`.

Masks ("which parameters may change") are pytrees shaped like params whose
leaves are either Python `False` (the whole leaf is frozen) or a boolean array
broadcastable to the leaf (e.g. [E, 1, 1] for expert slots). Use them with
`masked_optimizer` (optax.multi_transform: no optimiser state is allocated for
frozen leaves) plus `mask_tree` / `apply_masked_updates` inside a step, so
frozen entries stay bit-identical.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sleep_jax import sharding
from sleep_jax.models import cms

_EXPERT_LEAVES = ('lowrank_a', 'lowrank_b', 'router')


def _keys(path) -> list[str]:
  return [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]


def _level_leaf(path, level: int) -> str | None:
  """'lowrank_a' | 'lowrank_b' | 'router' | 'dense' if `path` is in `level`."""
  keys = _keys(path)
  name = cms.level_name(level)
  if name not in keys[:-1]:
    return None
  after = keys[keys.index(name) + 1:]
  if len(after) == 2 and after[0] == 'dense':
    return 'dense'
  if len(after) == 1 and after[0] in _EXPERT_LEAVES:
    return after[0]
  return None


def _slot_view(leaf_name: str, slots_E):
  """Reshapes a bool[E] slot mask to broadcast against that expert leaf."""
  if leaf_name == 'router':
    return slots_E[None, :]          # router [D, E]
  return slots_E[:, None, None]      # lowrank_a [E, D, R], lowrank_b [E, R, D]


def _check_unboxed(params) -> None:
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  if any(isinstance(x, nn.Partitioned) for x in leaves):
    raise ValueError('growth needs plain params; these still carry logical '
                     'partitioning boxes: pass nn.meta.unbox(params).')


def active_slots(state, level: int) -> list[int]:
  """Indices of the active low-rank experts of `level` (host values)."""
  return np.flatnonzero(np.asarray(_active(state, level))).tolist()


def _active(state, level: int):
  try:
    return state[cms.CMS_COLLECTION][cms.level_name(level)]
  except (KeyError, TypeError):
    levels = sorted(state.get(cms.CMS_COLLECTION, {})) if isinstance(state, dict) else []
    raise ValueError(
        f'CMS level {level} is not in the model state (levels present: '
        f"{levels}); state must be the model's non-param collections, "
        "{'cms': {'level_0': ..., ...}}.") from None


def zero_slots(tree, level: int, slots_E):
  """Zeros the given expert slots of `level` in any params-shaped tree.

  Works on params, gradients and optimiser states alike (their leaves are
  matched by path), e.g. to clear Adam moments of reset experts.
  """
  def clear(path, x):
    name = _level_leaf(path, level)
    if name in _EXPERT_LEAVES:
      return jnp.where(_slot_view(name, slots_E), jnp.zeros_like(x), x)
    return x
  return jax.tree_util.tree_map_with_path(clear, tree)


def _with_active(state, level: int, active_E):
  """`state` with level's active mask replaced (a new dict, inputs intact)."""
  masks = {**state[cms.CMS_COLLECTION], cms.level_name(level): active_E}
  return {**state, cms.CMS_COLLECTION: masks}


@functools.partial(jax.jit, static_argnames='level')
def _grow_slot(params, state, slot, rng, *, level: int):
  num_experts = _active(state, level).shape[0]
  slots_E = jnp.arange(num_experts) == slot

  def init(path, x):
    name = _level_leaf(path, level)
    if name == 'lowrank_a':
      keys = _keys(path)
      layer = next((k for k in keys if k.startswith('layers_')), '0')
      key = jax.random.fold_in(rng, int(layer.split('_')[-1]))
      fresh = jax.random.normal(key, x.shape[1:], x.dtype) * (
          1.0 / np.sqrt(x.shape[1]))
      return jnp.where(_slot_view(name, slots_E), fresh[None], x)
    if name in ('lowrank_b', 'router'):
      return jnp.where(_slot_view(name, slots_E), jnp.zeros_like(x), x)
    return x

  params = jax.tree_util.tree_map_with_path(init, params)
  return params, _with_active(state, level, _active(state, level) | slots_E)


def grow(params, state, level: int, rng) -> tuple[Any, Any, int]:
  """Unlocks the first free expert slot of `level` in every layer.

  Returns (params', state', slot); the inputs are left untouched. Raises
  ValueError naming the level, E_max and the config key when every slot is
  in use.
  """
  _check_unboxed(params)
  active = np.asarray(_active(state, level))
  free = np.flatnonzero(~active)
  if free.size == 0:
    raise ValueError(
        f'CMS level {level} has no free expert slot: all E_max='
        f'{active.size} low-rank experts are active. Raise '
        f'model.cms_levels[{level}].num_experts, or reset consolidated '
        'experts of this level before growing again.')
  slot = int(free[0])
  grown = _grow_slot(params, state, jnp.int32(slot), rng, level=level)
  params, state = sharding.place_like(grown, (params, state))
  return params, state, slot


@functools.partial(jax.jit, static_argnames='level')
def _reset_slots(params, state, slots_E, *, level: int):
  params = zero_slots(params, level, slots_E)
  return params, _with_active(state, level, _active(state, level) & ~slots_E)


def reset(params, state, level: int, slots: Iterable[int]) -> tuple[Any, Any]:
  """Returns `slots` of `level` to inactive (zeroed), freeing them for growth."""
  _check_unboxed(params)
  num_experts = np.asarray(_active(state, level)).size
  slots = [int(s) for s in slots]
  bad = [s for s in slots if not 0 <= s < num_experts]
  if bad:
    raise ValueError(f'reset: slots {bad} are out of range for CMS level '
                     f'{level}, which has E_max={num_experts} slots.')
  slots_E = np.zeros((num_experts,), np.bool_)
  slots_E[slots] = True
  out = _reset_slots(params, state, jnp.asarray(slots_E), level=level)
  return sharding.place_like(out, (params, state))


# ----------------------------------------------------------------- masks ---


def expert_mask(params, level: int, slots_E, *, dense: bool = False):
  """Trainable mask: the given expert slots (A, B, router row) of `level`.

  `slots_E` is a bool[E_max] array (data, so a different slot does not
  recompile a step that takes the mask as an argument). `dense=True` also
  unlocks the level's dense expert. Every other leaf is `False`.
  """
  slots_E = jnp.asarray(slots_E, jnp.bool_)

  def leaf(path, x):
    del x
    name = _level_leaf(path, level)
    if name in _EXPERT_LEAVES:
      return _slot_view(name, slots_E)
    if name == 'dense' and dense:
      return jnp.ones((), jnp.bool_)
    return False
  return jax.tree_util.tree_map_with_path(leaf, params)


def mask_tree(tree, mask):
  """Zeros the entries of a params-shaped tree (grads, updates) not in mask."""
  return jax.tree.map(
      lambda m, x: jnp.zeros_like(x) if m is False else jnp.where(m, x, 0),
      mask, tree, is_leaf=lambda x: x is False)


def apply_masked_updates(params, updates, mask):
  """params + updates where the mask is True; the rest stays bit-identical."""
  return jax.tree.map(
      lambda m, p, u: p if m is False else jnp.where(m, p + u.astype(p.dtype), p),
      mask, params, updates, is_leaf=lambda x: x is False)


def masked_optimizer(tx: optax.GradientTransformation, mask
                     ) -> optax.GradientTransformation:
  """`tx` on the leaves the mask can unlock; frozen leaves get no state.

  Entries masked off inside a trainable leaf must still be zeroed in the
  step (`mask_tree` on grads, `apply_masked_updates` on the result): the
  mask's arrays are data, this wrapper only sees which leaves can train.
  """
  labels = jax.tree.map(lambda m: 'frozen' if m is False else 'trainable',
                        mask, is_leaf=lambda x: x is False)
  return optax.multi_transform(
      {'trainable': tx, 'frozen': optax.set_to_zero()}, labels)


def params_in_use(params, model_state) -> int:
  """Parameters that take part in the forward pass: masked-off expert slots
  do not count. (`cms.active_param_count` counts the CMS levels' active
  parameters from the config alone.)"""
  total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  masks = model_state.get(cms.CMS_COLLECTION, {})
  for level in range(len(masks)):
    inactive_E = ~np.asarray(masks[cms.level_name(level)])
    mask = expert_mask(params, level, inactive_E)
    total -= sum(int(np.sum(np.broadcast_to(m, np.shape(x))))
                 for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(params))
                 if m is not False)
  return total
