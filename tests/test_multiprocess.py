"""Real multi-process runs on this machine: N JAX processes joined by
jax.distributed over gloo (`launch.local`), each with fake CPU devices,
against one process holding as many devices. Not a simulation: the
processes exchange their collectives over TCP."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Trains the smoke LM with its weights sharded over all 4 devices (fsdp),
# then prints how its largest parameter is laid out on this process.
_TRAIN_LM = '''
import json, sys
from sleep_jax import sharding
sharding.maybe_initialize_distributed()
import jax
from experiments.configs import train_lm
from sleep_jax import lm_trainer
config = train_lm.get_config('smoke')
config.mesh.data, config.mesh.fsdp = 1, 4
result = lm_trainer.train(config, sys.argv[1])
leaf = max(jax.tree.leaves(result['state'].params), key=lambda x: x.size)
print('LAYOUT ' + json.dumps({
    'process': jax.process_index(),
    'fully_addressable': leaf.is_fully_addressable,
    'devices': len(leaf.sharding.device_set),
    'local_shards': sorted(str(s.index) for s in leaf.addressable_shards)}),
    flush=True)
'''


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR')}
  return dict(env, PYTHONPATH=REPO, **extra)


def _layouts(stdout: str) -> list[dict]:
  return [json.loads(line.split('LAYOUT ', 1)[1])
          for line in stdout.splitlines() if 'LAYOUT ' in line]


def _losses(workdir: str) -> list[float]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['loss'] for line in f]


def _params(workdir: str) -> list[np.ndarray]:
  path = os.path.join(workdir, 'checkpoints', '20', 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return jax.tree.leaves(checkpointer.restore(path, restore_args=args)['params'])


@pytest.mark.slow
def test_train_lm_on_two_processes_matches_one_process(tmp_path):
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  single = subprocess.run(
      [sys.executable, '-c', _TRAIN_LM, one], cwd=REPO, capture_output=True,
      text=True, timeout=300, check=False,
      env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=4'))
  assert single.returncode == 0, single.stdout + single.stderr
  multi = subprocess.run(
      [sys.executable, '-m', 'launch.local', '--processes=2',
       '--devices-per-process=2', '--', sys.executable, '-c', _TRAIN_LM, two],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env=_env())
  assert multi.returncode == 0, multi.stdout + multi.stderr

  # The weights really span the processes: each holds half of the shards.
  layouts = _layouts(multi.stdout)
  assert sorted(l['process'] for l in layouts) == [0, 1]
  for layout in layouts:
    assert not layout['fully_addressable'] and layout['devices'] == 4
    assert len(layout['local_shards']) == 2
  assert not set(layouts[0]['local_shards']) & set(layouts[1]['local_shards'])
  (alone,) = _layouts(single.stdout)
  assert alone['fully_addressable'] and len(alone['local_shards']) == 4

  # Same loss curve and same final weights as one process.
  np.testing.assert_allclose(_losses(two), _losses(one), atol=1e-5, rtol=0)
  for a, b in zip(_params(two), _params(one), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  # One writer: the result files exist once, written by process 0.
  assert os.listdir(os.path.join(two, 'tensorboard'))
  assert os.path.exists(os.path.join(two, 'final_metrics.json'))


def test_a_tensor_axis_across_processes_is_refused(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'launch.local', '--processes=2', '--',
       sys.executable, '-m', 'experiments.train_lm',
       '--config=experiments/configs/train_lm.py:smoke',
       f'--workdir={tmp_path}', '--config.mesh.data=1',
       '--config.mesh.tensor=2'],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
      env=_env())
  assert result.returncode == 2, result.stdout + result.stderr
  assert ('[p0] error: mesh.tensor=2 spans processes (each has 1 device): '
          'keep the tensor axis within one host') in result.stdout
