"""The command line's own checks, before absl parses the flags and before TensorFlow or JAX load:
a config file that is missing or does not parse, `--config.KEY=VALUE` overrides of keys that do
not exist (with the closest existing keys), flag values of the wrong type, a workdir that cannot
be one, and a workdir in use by another run. Each ends the command with one line and the exit
code of its kind (kldino/errors.py), never a stack trace.
"""
from __future__ import annotations

import difflib
import errno
import fcntl
import importlib.util
import os
import sys
import tempfile
import traceback

from kldino import modes
from kldino.config import workdir
from kldino.errors import UsageError

_LOCK_FILE = '.kldino.lock'


def fail(message: str, code: int = UsageError.exit_code):
  """Ends the command with `kldino: message` on stderr; the traceback too with --verbose."""
  if '--verbose' in sys.argv:
    traceback.print_exc()
  print(f'kldino: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def disk_full(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, is a full disk or quota (ENOSPC, EDQUOT),
  whichever library raised it: orbax and TensorFlow carry the OS error in their message."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if 'No space left on device' in str(error) or 'Disk quota exceeded' in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class _WithoutTraceback:
  """A logging filter: records keep their message and lose their stack trace."""

  def filter(self, record) -> bool:
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def _log_thread_exception(args):
  import logging  # pylint: disable=import-outside-toplevel
  logging.error('%s in thread %s: %s', args.exc_type.__name__, getattr(args.thread, 'name', '?'),
                args.exc_value)


def _log_unraisable(args):
  import logging  # pylint: disable=import-outside-toplevel
  logging.error('%s ignored%s: %s', args.exc_type.__name__,
                f' in {args.object!r}' if args.object is not None else '', args.exc_value)


class _OwnInfoOnly:
  """A logging filter: below WARNING, only kldino's own records (its progress lines)."""

  def __init__(self, own_dir: str):
    self.own_dir = own_dir

  def filter(self, record) -> bool:
    return record.levelno >= 30 or record.pathname.startswith(self.own_dir)


def quiet_libraries(verbosity: int):
  """Below absl's --verbosity=1, the libraries' informational lines (orbax logs about forty per
  checkpoint, TFDS and JAX more at start-up) stay off the console; their warnings and errors,
  and all of kldino's lines, stay on it."""
  if verbosity >= 1:
    return
  import logging  # pylint: disable=import-outside-toplevel
  own_dir = os.path.dirname(os.path.abspath(__file__))
  for handler in logging.getLogger().handlers:
    handler.addFilter(_OwnInfoOnly(own_dir))


def quiet_tracebacks():
  """Unless --verbose, what other threads report of their failures prints as one line each:
  log records lose their stack trace (orbax's and clu's writers log their threads' exceptions
  with one), an exception that ends a thread, or that Python can only ignore (tensorstore
  under orbax reports its callbacks' so), is logged as a line, and asyncio's complaints
  about the futures a failed checkpoint write abandons are not printed. The failure itself
  reaches the main thread and ends the command with `fail`."""
  if '--verbose' in sys.argv:
    return
  import logging  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel
  # logging.lastResort prints what arrives when no handler is left (at interpreter exit).
  for handler in [*logging.getLogger().handlers, logging.lastResort]:
    handler.addFilter(_WithoutTraceback())
  logging.getLogger('asyncio').setLevel(logging.CRITICAL)
  threading.excepthook = _log_thread_exception
  sys.unraisablehook = _log_unraisable


def check_output(path: str, *, directory: bool = False):
  """--output: its folder (or, with `directory`, itself) is made when missing and must be
  writable, before anything is computed; UsageError otherwise."""
  if '://' in path:  # a bucket: written through etils.epath (kldino/runtime/files.py)
    return
  folder = os.path.abspath(path) if directory else os.path.dirname(os.path.abspath(path))
  if directory and os.path.isfile(folder):
    raise UsageError(f'--output={path} is a file: pass a folder for the preview')
  if not directory and os.path.isdir(path):
    raise UsageError(f'--output={path} is a folder: pass a file path')
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as error:
    raise UsageError(f'--output={path}: its folder cannot be created ({error.strerror}): choose '
                     'another path') from None
  try:  # a file made and removed there: os.access trusts permission bits that may not apply
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as error:
    raise UsageError(f'--output={path}: no file can be written in {folder} ({error.strerror}): '
                     'choose another path') from None


def _flag_values(argv: list[str], name: str) -> list[str]:
  values = []
  for index, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      values.append(arg.split('=', 1)[1])
    elif arg == f'--{name}' and index + 1 < len(argv):
      values.append(argv[index + 1])
  return values


def load_config_file(spec: str):
  """The config of `--config=PATH[:ARG]`: PATH's get_config(ARG); UsageError naming the file
  (and the line) when it is missing, does not parse or has no get_config."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise UsageError(f'--config={path}: no such file; pass the path of a config file with '
                     'get_config(), e.g. --config=configs/digits.py')
  module_spec = importlib.util.spec_from_file_location('_kldino_checked_config', path)
  if module_spec is None:
    raise UsageError(f'--config={path} is not a Python config file: pass a file with '
                     'get_config(), e.g. --config=configs/digits.py, or a saved config.json')
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as error:
    raise UsageError(f'--config={path} does not parse: line {error.lineno}: {error.msg}') from None
  except Exception as error:  # pylint: disable=broad-except
    raise UsageError(f'--config={path} failed to load: {type(error).__name__}: {error}') from None
  if not hasattr(module, 'get_config'):
    raise UsageError(f'--config={path} has no get_config(): a config file defines '
                     'get_config(arg=None) returning a ConfigDict')
  try:
    return module.get_config(arg or None)
  except ValueError as error:  # a config's own check of its argument
    raise UsageError(str(error)) from None
  except Exception as error:  # pylint: disable=broad-except
    raise UsageError(
        f'--config={spec}: get_config failed: {type(error).__name__}: {error}') from None


def config_keys(config, prefix: str = '') -> list[str]:
  """Every key of a (nested) ConfigDict, dotted."""
  keys = []
  for name, value in config.items():
    key = f'{prefix}{name}'
    keys.append(key)
    if hasattr(value, 'items'):
      keys.extend(config_keys(value, f'{key}.'))
  return keys


def check_overrides(config, argv: list[str]):
  """UsageError for the first `--config.KEY=VALUE` whose KEY the config does not have, naming
  the closest existing keys."""
  keys = set(config_keys(config))
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    key = arg[len('--config.'):].split('=', 1)[0]
    if key in workdir.RENAMED_KEYS:
      raise UsageError(workdir.renamed_key_message(key))
    if key not in keys:
      close = difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.6)
      hint = (f'did you mean {" or ".join(close)}?'
              if close else 'the keys and their defaults are in kldino/config/defaults.py')
      raise UsageError(f'unknown config key {key} (--config.{key}): {hint}')


_WORKDIR_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', 'workdir.py')


def _flag_value(argv: list[str], name: str) -> str | None:
  values = _flag_values(argv, name)
  return values[0] if values else None


def _saved_config(arg: str, *, after_flag: bool) -> str:
  """A --config argument naming a saved config.json, as the workdir config's argument."""
  if arg.startswith('--config=') and arg.endswith('.json'):
    return f'--config={_WORKDIR_CONFIG}:{arg.split("=", 1)[1]}'
  return f'{_WORKDIR_CONFIG}:{arg}' if after_flag and arg.endswith('.json') else arg


def with_workdir_config(argv: list[str]) -> list[str]:
  """argv with `--config=<kldino>/config/workdir.py:DIR` when a mode that reads a checkpoint has
  no --config (config overrides need a config flag that comes before them), and with
  `--config=<kldino>/config/workdir.py:FILE.json` for `--config=FILE.json` (a saved config)."""
  argv = [
      _saved_config(arg, after_flag=index > 0 and argv[index - 1] == '--config')
      for index, arg in enumerate(argv)
  ]
  configs = _flag_values(argv, 'config')
  workdir, mode = _flag_value(argv, 'workdir'), _flag_value(argv, 'mode')
  reads_workdir_config = mode in modes.MODES and modes.MODES.get(mode).reads_workdir_config
  if configs or not reads_workdir_config or not workdir:
    return argv
  return [argv[0], f'--config={_WORKDIR_CONFIG}:{workdir}', *argv[1:]]


def check_command_line(argv: list[str], default_config: str | None = None):
  """The checks above for argv (default_config: the --config used when argv has none)."""
  specs = _flag_values(argv, 'config') or ([default_config] if default_config else [])
  if specs:
    check_overrides(load_config_file(specs[-1]), argv)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, ending a bad flag value in one line (absl's own handler prints two and
  a config override of the wrong type a stack trace)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(str(error).replace('\n', ' '))
  except Exception as error:  # pylint: disable=broad-except
    fail(f'bad command line: {type(error).__name__}: {error}')


def check_workdir(workdir: str):
  """A local workdir must be a directory we can create and write; remote ones (gs://...) are
  checked by the checkpointer."""
  if '://' in workdir:
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f'--workdir={workdir} is a file, not a directory: pass a directory '
                     '(it is created if missing)')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise UsageError(f'--workdir={workdir} cannot be created ({error.strerror}): pass a '
                     'directory you can write') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UsageError(f'--workdir={workdir} is not writable: pass a directory you can write')


def lock_workdir(workdir: str):
  """Holds an exclusive lock on the workdir for the life of this process (released by the
  kernel when the process ends, however it ends: a killed run leaves no stale lock), so that a
  second run on the same workdir refuses instead of interleaving checkpoints; the open file is
  returned to keep the lock. Remote workdirs are not locked."""
  if '://' in workdir:
    return None
  lock = open(os.path.join(workdir, _LOCK_FILE), 'a+')  # pylint: disable=consider-using-with
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as error:
    lock.close()
    if error.errno in (errno.EAGAIN, errno.EACCES):
      raise UsageError(
          f'--workdir={workdir} is in use by another kldino run: wait for it to '
          'end, stop it (SIGTERM saves a checkpoint), or use another workdir') from None
    raise
  lock.seek(0)
  lock.truncate()
  lock.write(f'{os.getpid()}\n')
  lock.flush()
  return lock
