"""Checksums that tell a checkpoint read back from one that was damaged.

Orbax restores whatever bytes are on disk: a few flipped bytes in a data
file decode into wrong numbers (a NaN embedding) without an error. A SHA-256
per array, taken when it is saved and compared when it is restored, turns
that into a `CorruptCheckpointError` naming the checkpoint and the array.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np


class CorruptCheckpointError(ValueError):
  """A checkpoint whose contents do not match the checksums saved with it."""


def _addressable(tree) -> bool:
  return all(getattr(x, 'is_fully_addressable', True)
             for x in jax.tree.leaves(tree))


def checksums(tree) -> dict[str, str] | None:
  """{array path: sha256 of dtype, shape and bytes} of every leaf; None if
  some array is not whole on this process (a multi-host shard)."""
  if not _addressable(tree):
    return None
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree)):
    leaf = np.ascontiguousarray(leaf)
    digest = hashlib.sha256(f'{leaf.dtype}:{leaf.shape}:'.encode())
    digest.update(leaf.tobytes())
    out[jax.tree_util.keystr(path)] = digest.hexdigest()
  return out


def verify(tree, expected: dict[str, str] | None, where: str) -> None:
  """Raises CorruptCheckpointError naming `where` and the first array whose
  checksum differs from `expected` (nothing to check if it is None)."""
  if expected is None or not _addressable(tree):
    return
  actual = checksums(tree)
  if set(actual) != set(expected):
    raise CorruptCheckpointError(
        f'{where}: holds arrays {sorted(set(actual) ^ set(expected))[:3]} '
        'that its checksums do not list (or the reverse).')
  for name, digest in expected.items():
    if actual[name] != digest:
      raise CorruptCheckpointError(
          f'{where}: array {name} does not match the checksum saved with it '
          '(damaged on disk).')


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()
