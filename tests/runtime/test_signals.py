"""kldino/runtime/signals.py: SIGTERM and Ctrl-C ask a loop to stop after its step, or stop at once
outside the steps, and leave the handlers as they were."""
import os
import signal

import pytest

from kldino import errors
from kldino.runtime import signals


class _Checkpointer:
  """What after_step uses of kldino/checkpoint.py:Checkpointer."""

  def __init__(self, preempted_at=None):
    self.preempted_at, self.waited = preempted_at, False

  def reached_preemption(self, step):
    return step == self.preempted_at

  def wait(self):
    self.waited = True


@pytest.mark.parametrize('signum, error', [(signal.SIGTERM, errors.Preempted),
                                           (signal.SIGINT, errors.Interrupted)])
def test_a_signal_is_noted_and_the_loop_saves_then_raises_its_error(signum, error):
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  saved, checkpointer = [], _Checkpointer()
  with signals.StopRequests('a checkpoint') as stop:
    stop.after_step(2, checkpointer, lambda: saved.append(2), 'stopped at step 2')
    assert not saved and not checkpointer.waited  # no request: the loop goes on
    os.kill(os.getpid(), signum)  # handled between bytecodes: noted, nothing raised
    with pytest.raises(error) as stopped:
      stop.after_step(3, checkpointer, lambda: saved.append(3), 'stopped at step 3')
  assert type(stopped.value) is error and str(stopped.value) == 'stopped at step 3'
  assert saved == [3] and checkpointer.waited
  assert {s: signal.getsignal(s) for s in before} == before


def test_several_processes_stop_at_the_preemption_sync_point():
  saved = []
  with signals.StopRequests('a checkpoint') as stop:
    with pytest.raises(errors.Preempted):
      for step in range(1, 10):
        stop.after_step(step, _Checkpointer(preempted_at=4), lambda: saved.append(step), 'stop')
  assert saved == [4]


def test_a_second_ctrl_c_stops_at_once():
  with pytest.raises(KeyboardInterrupt):
    with signals.StopRequests('a checkpoint'):
      os.kill(os.getpid(), signal.SIGINT)
      os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize('signum, error', [(signal.SIGTERM, errors.Preempted),
                                           (signal.SIGINT, errors.Interrupted)])
def test_outside_the_steps_a_signal_stops_at_once(signum, error):
  with pytest.raises(error, match='stopped on request while scoring'):
    with signals.stops_at_once('while scoring'):
      os.kill(os.getpid(), signum)
      raise AssertionError('not reached: the signal raised')
