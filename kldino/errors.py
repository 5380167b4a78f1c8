"""Every way a kldino command can end, and its exit code: one table (ERRORS) that the entry point
(kldino/main.py) reads and docs/failures.md lists. Each message names the problem and the fix in
one line; the command prints it as `kldino: <message>`, without a stack trace unless --verbose.
"""
from __future__ import annotations


class KldinoError(Exception):
  """A failure the command reports in one line and ends with `exit_code`."""
  exit_code = 1
  kind = 'anything else'


class UsageError(KldinoError):
  """The command line asks for something that cannot work: a flag, a file, the workdir."""
  exit_code = 2
  kind = 'the command line'


class ConfigError(KldinoError, ValueError):
  """A config value that cannot work; the message names the key and the fix."""
  exit_code = 2
  kind = 'the config or a checkpoint that does not fit it'


class DataError(ConfigError):
  """The dataset the config names cannot be read: missing, unprepared, empty splits."""
  exit_code = 3
  kind = 'the dataset'


class TooManyUnreadable(DataError):
  """More than data.max_corrupt_fraction of a split's images could not be decoded."""
  kind = 'too many images that cannot be decoded'


class NonFiniteLoss(KldinoError):
  """Training stopped: the loss or a gradient is not finite; the last checkpoint is intact."""
  exit_code = 4
  kind = 'a non-finite loss or gradient'


class WriteFailed(KldinoError):
  """A checkpoint or result could not be written (a full disk, a lost mount); the committed
  checkpoints are intact."""
  exit_code = 5
  kind = 'the workdir could not be written'


class CollapseStopped(KldinoError):
  """guard.collapse=stop saw a collapse: the checkpoint of that step is saved."""
  exit_code = 6
  kind = 'a collapse, with guard.collapse=stop'


class Preempted(KldinoError):
  """Stopped on SIGTERM (or a preemption notice) with the work saved: the same command resumes."""
  exit_code = 0
  kind = 'SIGTERM or preemption: saved, rerun to resume'


class Interrupted(Preempted):
  """Stopped on Ctrl-C (SIGINT) with the work saved: the same command resumes."""
  exit_code = 130
  kind = 'Ctrl-C: saved, rerun to resume'


# The table: every error a command ends with, in the order of their exit codes.
ERRORS = (Preempted, KldinoError, UsageError, ConfigError, DataError, TooManyUnreadable,
          NonFiniteLoss, WriteFailed, CollapseStopped, Interrupted)
