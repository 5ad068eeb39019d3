r"""Checks that the processes of a launch join one mesh: run it first.

    python -m launch.local --processes=2 --devices-per-process=2 -- \
        python -m launch.probe

Every process prints its index, its local and global device counts and a
sum over the whole mesh (each device contributes its process index + 1),
so a pod whose hosts did not join shows it at once.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sleep_jax import sharding


def main() -> int:
  sharding.maybe_initialize_distributed()
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  local = np.full((jax.local_device_count(),), jax.process_index() + 1.0,
                  np.float32)
  x = jax.make_array_from_process_local_data(
      NamedSharding(mesh, PartitionSpec('data')), local)
  total = float(jax.jit(jnp.sum)(x))
  expected = sum((p + 1.0) * len([d for d in jax.devices()
                                  if d.process_index == p])
                 for p in range(jax.process_count()))
  print(f'process {jax.process_index()} of {jax.process_count()}: '
        f'{jax.local_device_count()} local / {jax.device_count()} global '
        f'devices, mesh sum {total:g} (expected {expected:g})', flush=True)
  return 0 if total == expected else 1


if __name__ == '__main__':
  sys.exit(main())
