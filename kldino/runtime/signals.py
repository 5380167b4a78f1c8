"""Stopping on SIGTERM or Ctrl-C without losing work, for every loop that checkpoints (training,
--mode=linear_eval).

Inside a loop (`StopRequests`), the first SIGTERM or Ctrl-C (SIGINT) is only noted: at the end
of its step the loop calls `after_step`, which saves, waits for the files and raises Preempted
(exit 0) for SIGTERM or Interrupted (exit 130) for Ctrl-C, whose one line says to rerun the same
command. A second Ctrl-C stops at once. Outside the steps, where there is nothing to save
(`stops_at_once`), either signal raises at once. With several processes, SIGTERM belongs to
JAX's preemption service (`after_step` polls its sync point) and the handlers are left alone.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Callable

import jax
from absl import logging

from kldino.errors import Interrupted, Preempted

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _error(signum: int, message: str) -> Preempted:
  return (Interrupted if signum == signal.SIGINT else Preempted)(message)


@contextlib.contextmanager
def _handlers(handler):
  if jax.process_count() > 1:
    yield
    return
  previous = {signum: signal.signal(signum, handler) for signum in _SIGNALS}
  try:
    yield
  finally:
    for signum, previous_handler in previous.items():
      signal.signal(signum, previous_handler)


class StopRequests:
  """A context manager: while it is active, SIGTERM and Ctrl-C ask the loop to stop after its
  current step (`after_step`); `saving` says in the log what the loop will save."""

  def __init__(self, saving: str):
    self.saving = saving
    self.signum = None
    self._handlers = None

  def _note(self, signum, frame):
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
    self.signum = signum
    logging.warning('%s received: saving %s after the current step%s',
                    signal.Signals(signum).name, self.saving,
                    ' (Ctrl-C again stops at once)' if signum == signal.SIGINT else '')

  def after_step(self, step: int, checkpointer, save: Callable[[], None], message: str):
    """At the end of the loop's `step`: on a request, or at JAX's preemption sync point (where
    several processes agree on the step to stop at), `save()`, wait for the checkpointer's files
    and raise Interrupted (after Ctrl-C) or Preempted with `message`."""
    if self.signum is None and not checkpointer.reached_preemption(step):
      return
    save()
    checkpointer.wait()
    raise _error(self.signum if self.signum is not None else signal.SIGTERM, message)

  def __enter__(self):
    self._handlers = _handlers(self._note)
    self._handlers.__enter__()
    return self

  def __exit__(self, *exc_info):
    return self._handlers.__exit__(*exc_info)


class _SignalNow(BaseException):
  """Raised by the handler of stops_at_once: a BaseException, as KeyboardInterrupt is, so that no
  `except Exception` on the way (logging's own emit has one) swallows it."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


def _raise_now(signum, frame):
  del frame
  raise _SignalNow(signum)


@contextlib.contextmanager
def stops_at_once(where: str):
  """SIGTERM or Ctrl-C raises Preempted / Interrupted at once while the block runs: nothing is
  lost that the checkpoints hold."""
  try:
    with _handlers(_raise_now):
      yield
  except _SignalNow as stop:
    raise _error(stop.signum, f'stopped on request {where}') from None
