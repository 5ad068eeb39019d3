"""Functional LoRA over any params pytree, batched over independent copies.

A LoRA adapter is a dict keyed by the '/'-joined path of each targeted kernel,
`{'a': [in, rank], 'b': [rank, out]}`, where `in` is the product of the
kernel's first `input_ndim` axes and `out` of the rest (q_kernel [D, H, Dh]
with input_ndim=1: in=D, out=H*Dh). `merge` returns the params with each
targeted kernel replaced by `W + (alpha / rank) * reshape(a @ b)`; nothing
else changes, and `b` starts at zero so a fresh adapter is the identity.

Two ways to apply one copy's adapter, with the same result: `merge` (any
kernel; one merged copy of each adapted kernel) and `as_collection`, the
model's 'lora' variable collection: the Transformer adds (x @ a) @ b next to
x @ W.
The second is the one to vmap over copies (`init(..., copies=N)` gives every
leaf a leading copy axis): all copies share each base matmul, and gradients
exist only for a and b, never for a kernel (docs/design.md §5, step 3).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp


# Every attention and MLP kernel of the Transformer.
ALL_KERNELS = ((r'attn/(q|k|v)_kernel$', 1), (r'attn/o_kernel$', 2),
               (r'(up|gate|down)_kernel$', 1))


def hashable_targets(targets) -> tuple[tuple[str, int], ...]:
  """`targets` as nested tuples: config files give lists, and configs holding
  them are static arguments of jitted functions, so they must hash."""
  return tuple((str(pattern), int(ndim)) for pattern, ndim in targets)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank, alpha (scale = alpha / rank) and the targeted kernels.

  `targets` is a tuple of (regex, input_ndim): a params leaf whose
  '/'-joined path matches the regex (re.search) gets an adapter, its first
  input_ndim axes being the input side.
  """
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[tuple[str, int], ...] = ((r'attn/(q|v)_kernel$', 1),)

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f'lora.rank={self.rank!r} must be an integer >= 1.')
    if not self.alpha > 0:
      raise ValueError(f'lora.alpha={self.alpha!r} must be > 0.')
    if not self.targets:
      raise ValueError('lora.targets is empty: name at least one kernel, '
                       "e.g. (('attn/(q|v)_kernel$', 1),).")
    for target in self.targets:
      if (not isinstance(target, (tuple, list)) or len(target) != 2
          or not isinstance(target[0], str)
          or not isinstance(target[1], int) or target[1] < 1):
        raise ValueError(f'lora.targets entry {target!r} must be '
                         '(regex string, input_ndim >= 1).')
      try:
        re.compile(target[0])
      except re.error as e:
        raise ValueError(f'lora.targets regex {target[0]!r}: {e}') from None
    # Configs are static arguments of jitted functions: lists would not hash.
    object.__setattr__(self, 'targets', hashable_targets(self.targets))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def targets(params, cfg: LoraConfig) -> dict[str, tuple[tuple[int, ...], int]]:
  """{path: (kernel shape, input_ndim)} of the kernels `cfg` adapts."""
  found = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = path_name(path)
    for pattern, input_ndim in cfg.targets:
      if re.search(pattern, name):
        if leaf.ndim <= input_ndim:
          raise ValueError(f'lora target {name} has shape {leaf.shape}: '
                           f'input_ndim={input_ndim} leaves no output axis.')
        found[name] = (tuple(leaf.shape), input_ndim)
        break
  if not found:
    raise ValueError(f'lora.targets {[p for p, _ in cfg.targets]} match no '
                     'params leaf; paths look like '
                     f'{path_name(jax.tree_util.tree_leaves_with_path(params)[0][0])!r}.')
  return found


def init(params, cfg: LoraConfig, rng, copies: int | None = None):
  """A fresh adapter (or `copies` independent ones): a ~ N(0, 1/in), b = 0."""
  adapter = {}
  for i, (name, (shape, input_ndim)) in enumerate(
      sorted(targets(params, cfg).items())):
    fan_in = math.prod(shape[:input_ndim])
    fan_out = math.prod(shape[input_ndim:])
    lead = () if copies is None else (copies,)
    a = jax.random.normal(jax.random.fold_in(rng, i), lead + (fan_in, cfg.rank),
                          jnp.float32) * fan_in ** -0.5
    adapter[name] = {'a': a, 'b': jnp.zeros(lead + (cfg.rank, fan_out),
                                           jnp.float32)}
  return adapter


def _check(params, adapter, cfg: LoraConfig) -> dict[str, int]:
  """{kernel: input_ndim} of one copy's `adapter`, after checking that every
  kernel is in `params`, is one of cfg.targets, and has factors of its shape
  (a copy axis is a mistake here: take one copy, or vmap over copies)."""
  kernels = {path_name(p): leaf.shape
             for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
  unknown = sorted(set(adapter) - set(kernels))
  if unknown:
    raise ValueError(f'adapter kernels {unknown} are not in params; an '
                     'adapter belongs to the model it was initialised on.')
  out = {}
  for name, factors in adapter.items():
    input_ndim = next((n for p, n in cfg.targets if re.search(p, name)), None)
    if input_ndim is None:
      raise ValueError(f'adapter kernel {name} matches none of lora.targets '
                       f'{[p for p, _ in cfg.targets]}: use the LoraConfig '
                       'the adapter was initialised with.')
    shape = kernels[name]
    want = {'a': (math.prod(shape[:input_ndim]), cfg.rank),
            'b': (cfg.rank, math.prod(shape[input_ndim:]))}
    for factor, expected in want.items():
      got = tuple(factors[factor].shape)
      if got != expected:
        hint = (' (a leading copy axis: apply one copy, lora.take(adapter, i),'
                ' or vmap over copies)' if got[1:] == expected else '')
        raise ValueError(f'adapter {name}/{factor} has shape {got}, expected '
                         f'{expected} for kernel {shape}, rank {cfg.rank}'
                         f'{hint}.')
    out[name] = input_ndim
  return out


def merge(params, adapter, cfg: LoraConfig):
  """params with `W + scale * a @ b` at each adapted kernel (one copy)."""
  _check(params, adapter, cfg)

  def leaf(path, w):
    name = path_name(path)
    if name not in adapter:
      return w
    delta = adapter[name]['a'] @ adapter[name]['b']
    return w + (cfg.scale * delta).reshape(w.shape).astype(w.dtype)
  return jax.tree_util.tree_map_with_path(leaf, params)


def as_collection(params, adapter, cfg: LoraConfig) -> dict:
  """One copy's adapter as the model's 'lora' variable collection (scale
  folded into b): `model.apply({'params': p, 'lora': as_collection(p, ad,
  cfg)}, x)` equals `model.apply({'params': merge(p, ad, cfg)}, x)` without
  forming any merged kernel. Only the kernels the Transformer's layers adapt
  this way (attention q/k/v/o, MLP gate/up/down) are allowed; use `merge`
  for others. `params` is only read for the check that every adapted kernel
  exists (the model would silently skip one that does not).
  """
  tree = {}
  for name, input_ndim in _check(params, adapter, cfg).items():
    *scopes, kernel = name.split('/')
    if kernel not in _UNMERGED_KERNELS:
      raise ValueError(f'{name}: only {sorted(_UNMERGED_KERNELS)} can be '
                       'adapted without merging; use lora.merge for it.')
    if input_ndim != _UNMERGED_KERNELS[kernel]:
      raise ValueError(f'{name} takes input_ndim={_UNMERGED_KERNELS[kernel]} '
                       f'in the Transformer, not {input_ndim}: fix lora.targets.')
    node = tree
    for scope in scopes:
      node = node.setdefault(scope, {})
    node[kernel] = {'a': adapter[name]['a'],
                    'b': cfg.scale * adapter[name]['b']}
  return tree


_UNMERGED_KERNELS = {'q_kernel': 1, 'k_kernel': 1, 'v_kernel': 1,
                     'o_kernel': 2, 'gate_kernel': 1, 'up_kernel': 1,
                     'down_kernel': 1}


def take(adapter, index):
  """Copy `index` of a batched adapter."""
  return jax.tree.map(lambda x: x[index], adapter)


def num_params(adapter) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(adapter))
