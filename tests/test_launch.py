"""Tests for launch/tpu_vm.py: the exact gcloud commands it prints.

Runs the CLI in a subprocess, always with --dry-run, so no gcloud is needed
and nothing is created.
"""

import os
import shlex
import subprocess
import sys

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
      f"$ gcloud compute tpus tpu-vm scp --recurse {shlex.quote(REPO)} 'lm:~/sleep_jax' "
      '--zone=us-central2-b --worker=all',
      '$ gcloud compute tpus tpu-vm ssh lm --zone=us-central2-b --worker=all '
      "'--command=cd ~/sleep_jax && pip install -r requirements.txt "
      "'\"'\"'jax[tpu]'\"'\"' && pip install -e .'",
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
