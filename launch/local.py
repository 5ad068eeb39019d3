r"""Runs a command as N JAX processes on this machine, the way a pod does.

    python -m launch.local --processes=2 --devices-per-process=2 -- \
        python -m experiments.train_lm \
        --config=experiments/configs/train_lm.py:smoke --workdir=/tmp/lm

Each process gets the coordinator address, the process count and its id
(read by `sleep_jax.sharding.maybe_initialize_distributed`), CPU devices
faked with XLA_FLAGS and CPU collectives over gloo: the processes form one
mesh of N x K devices, as the hosts of a Cloud TPU pod do. Their output is
streamed with a `[pI]` prefix. When one process fails, the others are
killed and the launcher exits with that process's status, naming it.

`worker_command` is the one place a worker's shell command is built: the
TPU launcher (`launch/tpu_vm.py`) uses it for every host of a pod.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

# How long the survivors get to exit on their own after one process fails
# before they are killed: long enough for JAX's runtime to declare the lost
# peer dead (sleep_jax.sharding's 10 s heartbeat timeout), as it would on a
# pod. What a survivor prints first is a race: inside a collective, Python
# sees the error and sleep_jax.cli prints "lost JAX process 1 of 2"; in the
# middle of a computation, the runtime's error-polling thread aborts the
# process in native code (SIGABRT) with its own log lines and Python prints
# nothing. So the one line a user can rely on is the launcher's last line,
# `error: process I of N failed (...); process J ended on its own: ...`.
GRACE_S = 30.0


def worker_command(argv: Sequence[str], env: Mapping[str, str],
                   cwd: str | None = None) -> str:
  """A POSIX shell command: `cd CWD && K=V ... ARGV`, quoted once."""
  parts = [f'cd {cwd} &&'] if cwd else []
  parts += [f'{k}={shlex.quote(str(v))}' for k, v in env.items()]
  return ' '.join(parts + [shlex.join(argv)])


def _device_flags(devices_per_process: int | None) -> str:
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split()
          if not f.startswith('--xla_force_host_platform_device_count')]
  if devices_per_process:
    kept.append(f'--xla_force_host_platform_device_count={devices_per_process}')
  return ' '.join(kept)


def worker_env(process_id: int, processes: int, coordinator: str,
               devices_per_process: int | None = None) -> dict[str, str]:
  """What process `process_id` of a local run needs in its environment."""
  return {'SLEEP_JAX_DISTRIBUTED': '1',
          'JAX_COORDINATOR_ADDRESS': coordinator,
          'JAX_NUM_PROCESSES': str(processes),
          'JAX_PROCESS_ID': str(process_id),
          'JAX_PLATFORMS': 'cpu',
          'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo',
          'XLA_FLAGS': _device_flags(devices_per_process)}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _stream(i: int, proc: subprocess.Popen, out) -> None:
  for line in proc.stdout:
    out.write(f'[p{i}] {line}')
    out.flush()


def run_workers(commands: Sequence[str], *, out=None,
                envs: Sequence[Mapping[str, str]] | None = None) -> int:
  """Runs one shell command per process; returns 0 when all succeed, else
  the first failure's status (the rest are killed)."""
  out = out or sys.stdout
  procs = []
  for i, command in enumerate(commands):
    env = dict(os.environ, **(envs[i] if envs else {}), PYTHONUNBUFFERED='1')
    procs.append(subprocess.Popen(
        ['bash', '-c', command], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True))
  for i, p in enumerate(procs):
    out.write(f'launch.local: process {i} is pid {p.pid}\n')
  out.flush()
  threads = [threading.Thread(target=_stream, args=(i, p, out), daemon=True)
             for i, p in enumerate(procs)]
  for t in threads:
    t.start()
  status, failed = 0, None
  while True:
    codes = [p.poll() for p in procs]   # every process, every time
    failed = next((i for i, c in enumerate(codes) if c not in (None, 0)),
                  None)
    if failed is not None or all(c is not None for c in codes):
      break
    time.sleep(0.2)
  if failed is not None:
    status = procs[failed].returncode
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(p.poll() is None
                                              for p in procs):
      time.sleep(0.2)
    survivors = []
    for i, p in enumerate(procs):
      if i == failed:
        continue
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        survivors.append(f'process {i} killed after {GRACE_S:.0f} s')
      else:
        survivors.append(f'process {i} ended on its own: {_why(p.returncode)}')
  for t in threads:
    t.join(timeout=5)
  if failed is not None:
    out.write(f'error: process {failed} of {len(procs)} failed '
              f'({_why(status)}); {"; ".join(survivors)}.\n')
    out.flush()
    return status if status > 0 else 128 - status
  return 0


def _why(returncode: int) -> str:
  if returncode < 0:
    return f'killed by {signal.Signals(-returncode).name}'
  return f'exit status {returncode}'


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  argv = list(argv)
  if '--' not in argv or argv.index('--') == len(argv) - 1:
    raise SystemExit('usage: python -m launch.local --processes=N '
                     '[--devices-per-process=K] [--port=P] -- COMMAND ...; '
                     'the command after "--" is missing.')
  i = argv.index('--')
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--processes', type=int, required=True)
  parser.add_argument('--devices-per-process', type=int, default=None,
                      help='CPU devices each process fakes (default: 1).')
  parser.add_argument('--port', type=int, default=0,
                      help='Coordinator port (default: a free one).')
  args = parser.parse_args(argv[:i])
  if args.processes < 1:
    parser.error(f'--processes={args.processes} must be >= 1.')
  if args.devices_per_process is not None and args.devices_per_process < 1:
    parser.error(f'--devices-per-process={args.devices_per_process} must be '
                 '>= 1.')
  return args, argv[i + 1:]


def main(argv: Sequence[str]) -> int:
  args, command = parse_args(argv)
  coordinator = f'127.0.0.1:{args.port or free_port()}'
  commands = [worker_command(command, worker_env(
      i, args.processes, coordinator, args.devices_per_process))
              for i in range(args.processes)]
  return run_workers(commands)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
