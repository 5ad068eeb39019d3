"""The launchers: launch/tpu_vm.py's exact gcloud commands (--dry-run, no
gcloud needed), its worker commands run for real through a local stand-in
for `gcloud ... ssh --worker=all`, and launch/local.py's N-process runs.
"""

import os
import re
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join('launch', 'tpu_vm.py')
COMMON = ['--name=lm', '--zone=us-central2-b']
MODULE = ['experiments.train_lm', '--config=experiments/configs/train_lm.py',
          '--workdir=gs://bucket/run']


def _launch(*argv, as_module=False):
  program = ['-m', 'launch.tpu_vm'] if as_module else [SCRIPT]
  return subprocess.run([sys.executable, *program, *argv], cwd=REPO,
                        capture_output=True, text=True, check=False)


def _dry_run(*argv):
  result = _launch(*argv)
  assert result.returncode == 0, result.stderr
  assert not result.stderr
  return result.stdout.splitlines()


def test_create():
  assert _dry_run('create', *COMMON, '--dry-run') == [
      '$ gcloud compute tpus tpu-vm create lm --zone=us-central2-b '
      '--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite',
  ]


def test_create_spot_project_and_type():
  assert _dry_run('create', *COMMON, '--project=my-proj', '--spot',
                  '--accelerator-type=v5litepod-64', '--version=v2-alpha',
                  '--dry-run') == [
      '$ gcloud compute tpus tpu-vm create lm --zone=us-central2-b '
      '--project=my-proj --accelerator-type=v5litepod-64 --version=v2-alpha '
      '--spot',
  ]


def test_run_forwards_module_and_args_to_all_workers():
  assert _dry_run('run', *COMMON, '--dry-run', '--', *MODULE) == [
      '$ gcloud compute tpus tpu-vm ssh lm --zone=us-central2-b --worker=all '
      "'--command=cd ~/sleep_jax && SLEEP_JAX_DISTRIBUTED=1 python3 -m experiments.train_lm "
      '--config=experiments/configs/train_lm.py '
      "--workdir=gs://bucket/run'",
  ]


def test_run_quotes_args_for_the_remote_shell():
  lines = _dry_run('run', *COMMON, '--dry-run', '--', 'experiments.train_lm',
                   '--config.name=a b')
  assert lines == [
      '$ gcloud compute tpus tpu-vm ssh lm --zone=us-central2-b --worker=all '
      "'--command=cd ~/sleep_jax && SLEEP_JAX_DISTRIBUTED=1 python3 -m experiments.train_lm "
      "'\"'\"'--config.name=a b'\"'\"''",
  ]


def test_delete():
  assert _dry_run('delete', *COMMON, '--project=p', '--dry-run') == [
      '$ gcloud compute tpus tpu-vm delete lm --zone=us-central2-b '
      '--project=p --quiet',
  ]


def test_all_runs_create_setup_run_delete_in_order():
  assert _dry_run('all', *COMMON, '--spot', '--dry-run', '--', *MODULE) == [
      '$ gcloud compute tpus tpu-vm create lm --zone=us-central2-b '
      '--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot',
      f"$ bash -c 'cd {REPO} && git ls-files -z | tar --null -T - -czf "
      "/tmp/sleep_jax-lm.tgz'",
      "$ gcloud compute tpus tpu-vm scp /tmp/sleep_jax-lm.tgz 'lm:~/sleep_jax.tgz' "
      '--zone=us-central2-b --worker=all',
      '$ gcloud compute tpus tpu-vm ssh lm --zone=us-central2-b --worker=all '
      "'--command=rm -rf ~/sleep_jax && mkdir -p ~/sleep_jax && tar -xzf "
      '~/sleep_jax.tgz -C ~/sleep_jax && cd ~/sleep_jax && pip install -r '
      "requirements.txt '\"'\"'jax[tpu]==0.10.2'\"'\"' && pip install -e .'",
      '$ gcloud compute tpus tpu-vm ssh lm --zone=us-central2-b --worker=all '
      "'--command=cd ~/sleep_jax && SLEEP_JAX_DISTRIBUTED=1 python3 -m experiments.train_lm "
      '--config=experiments/configs/train_lm.py '
      "--workdir=gs://bucket/run'",
      '$ gcloud compute tpus tpu-vm delete lm --zone=us-central2-b --quiet',
  ]


def test_run_without_module_is_an_error():
  for argv in (['run', *COMMON, '--dry-run'],
               ['run', *COMMON, '--dry-run', '--'],
               ['all', *COMMON, '--dry-run', '--', '--workdir=/tmp/x']):
    result = _launch(*argv)
    assert result.returncode != 0, argv
    assert not result.stdout, argv
    assert 'module' in result.stderr and 'missing' in result.stderr, argv


def test_runs_as_module_too():
  result = _launch('delete', *COMMON, '--dry-run', as_module=True)
  assert result.returncode == 0, result.stderr
  assert result.stdout == (
      '$ gcloud compute tpus tpu-vm delete lm --zone=us-central2-b --quiet\n')


def test_setup_packs_only_tracked_files(tmp_path):
  """The pack command run for real: tracked files in, an untracked
  directory (like a local .venv or a workdir) out."""
  repo = tmp_path / 'repo'
  (repo / 'pkg').mkdir(parents=True)
  (repo / 'pkg' / 'a.py').write_text('x = 1\n')
  (repo / '.venv' / 'lib').mkdir(parents=True)
  (repo / '.venv' / 'lib' / 'big.so').write_text('not tracked')
  subprocess.run(['git', 'init', '-q', str(repo)], check=True)
  subprocess.run(['git', '-C', str(repo), 'add', 'pkg'], check=True)
  sys.path.insert(0, REPO)
  try:
    from launch import tpu_vm  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(REPO)
  args = tpu_vm.parse_args(['setup', f'--name=t{os.getpid()}', '--zone=z'])
  pack = tpu_vm.setup_commands(args)[0]
  command = pack[2].replace(shlex.quote(REPO), shlex.quote(str(repo)), 1)
  subprocess.run(['bash', '-c', command], check=True)
  listing = subprocess.run(['tar', '-tzf', tpu_vm.archive_path(args)],
                           capture_output=True, text=True, check=True).stdout
  os.remove(tpu_vm.archive_path(args))
  assert listing.split() == ['pkg/a.py']


_FAKE_GCLOUD = '''#!/usr/bin/env python3
"""A stand-in for `gcloud compute tpus tpu-vm ssh NAME ... --worker=all
--command=CMD`: runs CMD once per worker of a local "pod", each worker with
the environment a pod's runtime would give it."""
import os, sys
sys.path.insert(0, os.environ['REPO'])
from launch import local
argv = sys.argv[1:]
assert argv[:4] == ['compute', 'tpus', 'tpu-vm', 'ssh'], argv
assert '--worker=all' in argv, argv
command = next(a for a in argv if a.startswith('--command='))[len('--command='):]
n = int(os.environ['FAKE_TPU_WORKERS'])
coordinator = f'127.0.0.1:{local.free_port()}'
envs = [local.worker_env(i, n, coordinator, 2) for i in range(n)]
sys.exit(local.run_workers([command] * n, envs=envs))
'''


def test_tpu_run_commands_start_workers_that_join_one_mesh(tmp_path):
  bin_dir, home = tmp_path / 'bin', tmp_path / 'home'
  bin_dir.mkdir()
  home.mkdir()
  (home / 'sleep_jax').symlink_to(REPO)   # what setup unpacks there
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(_FAKE_GCLOUD)
  gcloud.chmod(0o755)
  env = dict(os.environ, HOME=str(home), REPO=REPO, FAKE_TPU_WORKERS='2',
             PATH=f'{bin_dir}:{os.path.dirname(sys.executable)}:'
                  f"{os.environ['PATH']}")
  result = subprocess.run(
      [sys.executable, SCRIPT, 'run', *COMMON, '--', 'launch.probe'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  for i in range(2):
    assert (f'[p{i}] process {i} of 2: 2 local / 4 global devices, mesh sum 6 '
            '(expected 6)') in result.stdout, result.stdout


def _local(*argv, timeout=120):
  return subprocess.run([sys.executable, '-m', 'launch.local', *argv],
                        cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, check=False)


def test_local_processes_join_one_mesh():
  result = _local('--processes=2', '--devices-per-process=2', '--',
                  sys.executable, '-m', 'launch.probe')
  assert result.returncode == 0, result.stdout + result.stderr
  assert '[p1] process 1 of 2: 2 local / 4 global devices, mesh sum 6' in (
      result.stdout)


_DIES = '''
import os, signal, time
from sleep_jax import sharding
sharding.maybe_initialize_distributed()
import jax
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices('up')
if jax.process_index() == 1:
  os.kill(os.getpid(), signal.SIGKILL)
while True:
  multihost_utils.sync_global_devices('again')
  time.sleep(0.2)
'''


def test_local_fails_fast_naming_the_lost_process():
  t0 = time.monotonic()
  result = _local('--processes=2', '--', sys.executable, '-c', _DIES)
  assert result.returncode == 128 + 9, result.stdout + result.stderr
  assert time.monotonic() - t0 < 60
  # The last line names the lost process, and process 0 was not killed by
  # the launcher: JAX's runtime stopped it (as it would on a pod, with no
  # launcher). Whether process 0 printed the runtime's reason first is a
  # race (launch/local.py, GRACE_S), so it is not checked.
  assert re.fullmatch(
      r'error: process 1 of 2 failed \(killed by SIGKILL\); process 0 ended '
      r'on its own: (exit status \d+|killed by SIG[A-Z]+)\.',
      result.stdout.strip().splitlines()[-1]), result.stdout[-3000:]


def test_local_usage_errors():
  for argv, message in ((['--processes=2'], 'command after "--" is missing'),
                        (['--processes=0', '--', 'true'], '--processes=0')):
    result = _local(*argv)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr, argv
