r"""Runs an entry point of this repo on a Cloud TPU VM pod slice via gcloud.

Prints each gcloud command (prefixed by `$ `, shell-quoted so it can be
copy-pasted) and, unless --dry-run, executes it. Example for a v5e-16 pod
(4 hosts x 4 chips):

    python launch/tpu_vm.py create --name=lm --zone=us-central2-b --spot
    python launch/tpu_vm.py setup --name=lm --zone=us-central2-b
    python launch/tpu_vm.py run --name=lm --zone=us-central2-b -- \
        experiments.train_lm --config=experiments/configs/train_lm.py \
        --workdir=/mnt/shared/run
    python launch/tpu_vm.py delete --name=lm --zone=us-central2-b

or all four in one go with `all` (same flags, module after `--`).

`run` starts the same command on every host (--worker=all). That is all a
pod needs: every entry point calls `sleep_jax.sharding.maybe_initialize_
distributed()` first, which initialises jax.distributed on multi-host TPU
VMs (TPU_WORKER_HOSTNAMES is set there), so the hosts find each other
without further flags. --workdir must be a directory all hosts share (e.g.
a bucket mounted with gcsfuse at the same path on every host).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from typing import Sequence

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_DIR not in sys.path:  # run as a script: launch/tpu_vm.py
  sys.path.insert(0, REPO_DIR)
from launch import local  # noqa: E402  pylint: disable=g-import-not-at-top

REMOTE_DIR = '~/sleep_jax'
_TPU_VM = ['gcloud', 'compute', 'tpus', 'tpu-vm']


def _common(args: argparse.Namespace) -> list[str]:
  flags = [f'--zone={args.zone}']
  if args.project:
    flags.append(f'--project={args.project}')
  return flags


def _ssh_command(args: argparse.Namespace, remote: str) -> list[str]:
  # --worker=all: a pod slice has one VM per host, and every host must run
  # the same program for jax.distributed to come up.
  return [*_TPU_VM, 'ssh', args.name, *_common(args), '--worker=all',
          f'--command={remote}']


def create_command(args: argparse.Namespace) -> list[str]:
  cmd = [*_TPU_VM, 'create', args.name, *_common(args),
         f'--accelerator-type={args.accelerator_type}',
         f'--version={args.version}']
  if args.spot:
    cmd.append('--spot')
  return cmd


def pinned_jax() -> str:
  """The jax version requirements.txt pins: the TPU extra must match it (an
  unpinned `jax[tpu]` pulls a newer jax, or a libtpu that does not fit)."""
  with open(os.path.join(REPO_DIR, 'requirements.txt')) as f:
    for line in f:
      if line.startswith('jax=='):
        return line.split('==', 1)[1].strip()
  raise ValueError('requirements.txt pins no jax version (a `jax==` line).')


def archive_path(args: argparse.Namespace) -> str:
  return f'/tmp/sleep_jax-{args.name}.tgz'


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
  # Only the files git tracks, as they are in the working tree (uncommitted
  # edits included): never a local .venv, workdirs or caches. setup
  # replaces ~/sleep_jax on every host.
  archive = archive_path(args)
  pack = ['bash', '-c', f'cd {shlex.quote(REPO_DIR)} && git ls-files -z | '
          f'tar --null -T - -czf {archive}']
  scp = [*_TPU_VM, 'scp', archive, f'{args.name}:~/sleep_jax.tgz',
         *_common(args), '--worker=all']
  install = (f'rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && '
             f'tar -xzf ~/sleep_jax.tgz -C {REMOTE_DIR} && cd {REMOTE_DIR} && '
             f"pip install -r requirements.txt 'jax[tpu]=={pinned_jax()}' && "
             'pip install -e .')
  return [pack, scp, _ssh_command(args, install)]


def run_command(args: argparse.Namespace) -> list[str]:
  # The same worker command `launch.local` runs; on a pod JAX finds the
  # coordinator and the process ids itself, SLEEP_JAX_DISTRIBUTED=1 makes
  # sure it is asked even if the ssh shell lacks the TPU variables.
  return _ssh_command(args, local.worker_command(
      ['python3', '-m', args.module, *args.module_args],
      {'SLEEP_JAX_DISTRIBUTED': '1'}, cwd=REMOTE_DIR))


def delete_command(args: argparse.Namespace) -> list[str]:
  return [*_TPU_VM, 'delete', args.name, *_common(args), '--quiet']


def commands(args: argparse.Namespace) -> list[list[str]]:
  """All commands of `args.subcommand`, in the order they run."""
  if args.subcommand == 'create':
    return [create_command(args)]
  if args.subcommand == 'setup':
    return setup_commands(args)
  if args.subcommand == 'run':
    return [run_command(args)]
  if args.subcommand == 'delete':
    return [delete_command(args)]
  return [create_command(args), *setup_commands(args), run_command(args),
          delete_command(args)]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """Parses argv (without the program name); the part after `--` is the run."""
  argv = list(argv)
  # Split by hand: argparse would try to read the module's own flags
  # (--config=..., --workdir=...) as ours.
  if '--' in argv:
    i = argv.index('--')
    argv, forwarded = argv[:i], argv[i + 1:]
  else:
    forwarded = []

  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--name', required=True, help='TPU VM name.')
  common.add_argument('--zone', required=True, help='e.g. us-central2-b.')
  common.add_argument('--project', help='GCP project (default: gcloud config).')
  common.add_argument('--accelerator-type', default='v5litepod-16')
  common.add_argument('--version', default='v2-alpha-tpuv5-lite',
                      help='TPU VM runtime version.')
  common.add_argument('--spot', action='store_true',
                      help='Create a Spot (preemptible) slice.')
  common.add_argument('--dry-run', action='store_true',
                      help='Only print the commands.')

  parser = argparse.ArgumentParser(
      description=__doc__.split('\n', 1)[0],
      usage='%(prog)s {create,setup,run,delete,all} --name=N --zone=Z '
            '[flags] [-- MODULE ARGS...]')
  sub = parser.add_subparsers(dest='subcommand', required=True)
  sub.add_parser('create', parents=[common], help='Create the TPU VM.')
  sub.add_parser('setup', parents=[common],
                 help='Copy this repo to every host and install it.')
  sub.add_parser('run', parents=[common],
                 help='Run `python3 -m MODULE ARGS` on every host.')
  sub.add_parser('delete', parents=[common], help='Delete the TPU VM.')
  sub.add_parser('all', parents=[common],
                 help='create, setup, run, delete in order.')
  args = parser.parse_args(argv)

  needs_module = args.subcommand in ('run', 'all')
  if needs_module and (not forwarded or forwarded[0].startswith('-')):
    parser.error(f'{args.subcommand} needs a module to run after "--", e.g. '
                 f'`-- experiments.train_lm --config=... --workdir=...`; '
                 'the module is missing.')
  if forwarded and not needs_module:
    parser.error(f'{args.subcommand} takes no arguments after "--".')
  args.module = forwarded[0] if forwarded else None
  args.module_args = forwarded[1:]
  return args


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  cmds = commands(args)
  if args.dry_run:
    for cmd in cmds:
      print('$ ' + shlex.join(cmd))
    return 0
  # Checked up front so a missing SDK fails before anything is created.
  if shutil.which('gcloud') is None:
    print('error: `gcloud` is not on PATH. Install the Google Cloud SDK '
          '(https://cloud.google.com/sdk/docs/install), or use --dry-run to '
          'only print the commands.', file=sys.stderr)
    return 1
  for i, cmd in enumerate(cmds):
    print('$ ' + shlex.join(cmd), flush=True)
    try:
      subprocess.run(cmd, check=True)
    except subprocess.CalledProcessError as e:
      print(f'error: command failed with exit status {e.returncode}.',
            file=sys.stderr)
      # `all` still deletes the slice it created: a failed setup or run
      # should not leave a pod billing.
      if args.subcommand == 'all' and 0 < i < len(cmds) - 1:
        print('$ ' + shlex.join(cmds[-1]), flush=True)
        subprocess.run(cmds[-1], check=False)
      return e.returncode or 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
