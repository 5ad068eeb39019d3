"""What every `python -m experiments.<name>` entry point shares.

`run(main, config_flag)` is `absl.app.run(main)` with what a user of the
command line needs:

* errors in the config, the flags or the inputs print one line,
  `error: <key>=<value>: <why>; <fix>`, and exit with status 2; a failed
  run (divergence, a full disk) prints one line and exits with 1. A bug
  still shows its traceback, and `--traceback` (or SLEEP_JAX_TRACEBACK=1)
  shows it for every error;
* an unknown `--config.<key>` names the closest keys of the config;
* `--workdir` is locked against a second process for the whole run
  (sleep_jax.workdir.lock);
* library INFO logs (Orbax, TFDS, JAX's backend probing) are off unless
  `--verbosity=0` (or higher) asks for them.
"""

from __future__ import annotations

import difflib
import errno
import importlib.util
import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sleep_jax import workdir as workdir_lib

_TRACEBACK_ENV = 'SLEEP_JAX_TRACEBACK'
_TRACEBACK = flags.DEFINE_bool(
    'traceback', False, 'Show the Python traceback of an error instead of '
    'one line (also SLEEP_JAX_TRACEBACK=1).')

CONFIG_HELP = ('Config file, optionally with ":variant" (see the file\'s '
               'docstring for its variants). Any key can be overridden: '
               '--config.<key>.<subkey>=<value>, e.g. --config.sessions=5 '
               "--config.methods='(\"sleep\",\"finetune\")'.")

# Errors in what the user gave: the config, the flags, input files.
_USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError,
                NotADirectoryError, FileExistsError, IsADirectoryError,
                PermissionError)


# Ctrl-C exits without the interpreter's shutdown (tests replace this).
_hard_exit = os._exit  # pylint: disable=protected-access


class RunFailed(RuntimeError):
  """A run that cannot go on (e.g. diverged): one line, exit status 1."""


def define_config(entry_file: str, name: str | None):
  """The entry point's `--config` flag (default: experiments/configs/<name>
  next to it, so it works from any directory; None: required).

  ml_collections reads `--config.<key>` overrides from the command line
  already here, at import: a key it cannot parse is reported in one line.
  """
  default = None if name is None else os.path.join(
      os.path.dirname(os.path.abspath(entry_file)), 'configs', name)
  _DEFAULT_PATHS['config'] = default
  try:
    return config_flags.DEFINE_config_file('config', default, CONFIG_HELP,
                                           lock_config=True)
  except Exception as e:  # pylint: disable=broad-except
    if _traceback_asked(sys.argv):
      raise
    print(f'error: {_flag_error(e, sys.argv, "config")}', file=sys.stderr)
    sys.exit(2)


_DEFAULT_PATHS = {}


def _default_path(config_flag: str) -> str | None:
  """The default `--config` path (the flag's `default` is the loaded
  config itself)."""
  return _DEFAULT_PATHS.get(config_flag)


def _traceback_asked(argv) -> bool:
  return bool(os.environ.get(_TRACEBACK_ENV)) or any(
      a == '--traceback' or a.startswith('--traceback=') and
      a.split('=', 1)[1].lower() in ('1', 'true') for a in argv)


def _show_traceback() -> bool:
  return bool(os.environ.get(_TRACEBACK_ENV)) or (
      flags.FLAGS.is_parsed() and _TRACEBACK.value)


def _one_line(e: BaseException) -> str:
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  return ' '.join(text.split()) or type(e).__name__


def _config_value(argv, flag: str) -> str | None:
  """The value of `--flag` in `argv`; the last one wins, as in absl."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{flag}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{flag}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _flat_keys(tree, prefix='') -> list[str]:
  out = []
  for key, value in tree.items():
    out.append(prefix + key)
    if isinstance(value, dict):
      out += _flat_keys(value, f'{prefix}{key}.')
    if isinstance(value, (list, tuple)):
      for i, item in enumerate(value):
        if isinstance(item, dict):
          out += _flat_keys(item, f'{prefix}{key}[{i}].')
  return out


def _unknown_override(argv, flag: str, default: str | None) -> str | None:
  """'--config.<key>: no such key; did you mean ...' for the first override
  naming a key the config does not have, or None."""
  path = _config_value(argv, flag) or default
  if not path:
    return None
  path, _, variant = path.partition(':')
  try:
    spec = importlib.util.spec_from_file_location('_config_for_check', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    keys = _flat_keys(module.get_config(variant or None).to_dict())
  except Exception:  # pylint: disable=broad-except
    return None  # the file itself is broken: flag parsing says how
  for arg in argv:
    if arg.startswith(f'--{flag}.'):
      key = arg[len(flag) + 3:].split('=', 1)[0]
      if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = (f'did you mean {" or ".join(close)}?' if close else
                f'see the keys in {path}.')
        if re.search(r'\.\d+(\.|$)', key):
          hint = ('list items are overridden with brackets, e.g. '
                  + re.sub(r'\.(\d+)(?=\.|$)', r'[\1]', key))
        return f'--{flag}.{key}: the config has no key {key!r}; {hint}'
  return None


def _flag_error(e: BaseException, argv, config_flag: str) -> str:
  """One line for an error raised while reading the command line."""
  default = _default_path(config_flag)
  message = _unknown_override(argv, config_flag, default)
  if message is not None:
    return message
  chain = [e]
  while chain[-1].__cause__ or chain[-1].__context__:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  root = chain[-1]
  path = _config_value(argv, config_flag) or default
  text = str(e)
  if text.startswith(f'flag --{config_flag}.') or (
      'not supported for overriding' in text):
    if 'not supported for overriding' in text:
      field = re.search(r'field (\S+) is', text)
      return (f'{field.group(1) if field else "that field"} is a list, which '
              'cannot be given whole on the command line: override the '
              f'fields of its items (e.g. --{config_flag}.model.cms_levels[0]'
              '.width=64), or set it in the config file or a variant')
    return _one_line(e)  # names the override and its value
  if any(isinstance(x, flags.DuplicateFlagError) for x in chain):
    return (f'--{config_flag}={path}: not a config file (it defines '
            'command-line flags); a config file defines get_config(variant)')
  if (text.startswith('flag --') or isinstance(e, flags.Error)) and (
      not text.startswith(f'flag --{config_flag}=')):
    return _one_line(e)  # another flag: absl's message names it
  # The config file itself: its own error, not ml_collections' wrapping
  # (which inlines a traceback).
  if isinstance(root, AttributeError) and 'get_config' in str(root):
    return (f'--{config_flag}={path}: the file defines no get_config(variant) '
            'returning the config')
  message = f'--{config_flag}={path}: {_one_line(root)}'
  if isinstance(root, (OSError, ImportError)):
    message += f'; --{config_flag} takes a path to a config file' + (
        f', e.g. --{config_flag}={default}' if default else '')
  return message


def _parser(config_flag: str):
  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except
      if _traceback_asked(argv):
        raise
      print(f'error: {_flag_error(e, argv, config_flag)}', file=sys.stderr)
      sys.exit(2)
  return parse


def _disk_full(e: BaseException) -> bool:
  """ENOSPC anywhere in the chain: Orbax and TensorStore re-raise it as
  their own errors."""
  while e is not None:
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (
        'No space left on device' in str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def _name_lost_processes() -> None:
  """On several processes an error is most often a lost peer (a collective
  that broke): say which one, in one line, before this process stops."""
  import jax  # pylint: disable=g-import-not-at-top
  from sleep_jax import multihost, sharding  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return
  lost = multihost.lost_processes(sharding.heartbeat_timeout_s() + 10)
  if lost:
    print(f'error: lost JAX process {", ".join(map(str, lost))} of '
          f'{jax.process_count()} (it stopped answering the coordination '
          f'service); process {jax.process_index()} stops too. Run the same '
          'command again to resume.', file=sys.stderr, flush=True)


def _guarded(main, workdir_flag: str | None, config_flag: str | None = None):
  def wrapped(argv):
    if not flags.FLAGS['verbosity'].present:
      # absl logs INFO by default; --verbosity on the command line wins.
      logging.set_verbosity(logging.WARNING)
    if config_flag and config_flag in flags.FLAGS and not _show_traceback():
      try:
        # ml_collections defers a config file's load error to first use.
        config = flags.FLAGS[config_flag].value
        if config is not None:
          config.to_dict()
      except Exception as e:  # pylint: disable=broad-except
        root = e.__cause__ or e.__context__ or e
        default = _default_path(config_flag)
        print(f'error: --{config_flag}: {_one_line(root)}; it takes a path '
              'to a config file'
              + (f', e.g. --{config_flag}={default}' if default else ''),
              file=sys.stderr)
        sys.exit(2)
    # Before anything asks JAX for its devices (the workdir lock asks for
    # the process index): on a pod, jax.distributed must come first.
    from sleep_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.maybe_initialize_distributed()
    try:
      if workdir_flag and flags.FLAGS[workdir_flag].value:
        with workdir_lib.lock(flags.FLAGS[workdir_flag].value):
          status = main(argv)
      else:
        status = main(argv)
      # Processes that finish apart (process 0 writes the report) leave
      # together: JAX's shutdown barrier fails one that waits over 30 s.
      from sleep_jax import multihost  # pylint: disable=g-import-not-at-top
      multihost.barrier('end of run')
      return status
    except app.UsageError as e:
      if _show_traceback():
        raise
      print(f'error: {_one_line(e)}; flags go as --name=value (--help lists '
            'them).', file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      if _show_traceback():
        raise
      print('error: interrupted; run the same command again to resume from '
            'the last finished cycle (results.json says which runs are '
            'complete).', file=sys.stderr, flush=True)
      sys.stdout.flush()
      # Not sys.exit: library threads (checkpoint writers) cut mid-work can
      # crash the interpreter's shutdown. Every file is whole already.
      _hard_exit(130)
    except Exception as e:  # pylint: disable=broad-except
      _name_lost_processes()
      if _show_traceback():
        raise
      if _disk_full(e):
        where = getattr(e, 'filename', None) or (
            flags.FLAGS[workdir_flag].value if workdir_flag else '')
        print(f'error: no space left on the device writing {where}; free '
              'space and run the same command again: it resumes from the '
              'last whole checkpoint.', file=sys.stderr)
        sys.exit(1)
      # Imported here: a flag error should not wait for JAX to load.
      from sleep_jax.checkpoints.integrity import CorruptCheckpointError  # pylint: disable=g-import-not-at-top
      if isinstance(e, (RunFailed, FloatingPointError, CorruptCheckpointError,
                        workdir_lib.WorkdirBusy)):
        print(f'error: {_one_line(e)}', file=sys.stderr)
        sys.exit(1)
      if isinstance(e, _USER_ERRORS):
        print(f'error: {_one_line(e)}', file=sys.stderr)
        sys.exit(2)
      traceback.print_exc()
      print(f'error: {type(e).__name__}: {_one_line(e)} (a bug: please '
            'report it with the traceback above)', file=sys.stderr)
      sys.exit(1)
  return wrapped


def run(main, config_flag: str = 'config',
        workdir_flag: str | None = 'workdir') -> None:
  """absl's app.run(main) with one-line errors, quiet library logs and
  `--<workdir_flag>` locked while main runs."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(_guarded(main, workdir_flag, config_flag),
          flags_parser=_parser(config_flag))
