"""kldino/runtime/signals.py: SIGTERM and Ctrl-C ask a loop to stop after its step, or stop at once
outside the steps, and leave the handlers as they were."""
import os
import signal

import pytest

from kldino import errors
from kldino.runtime import signals


@pytest.mark.parametrize('signum, error', [(signal.SIGTERM, errors.Preempted),
                                           (signal.SIGINT, errors.Interrupted)])
def test_a_signal_is_noted_and_the_loop_raises_its_error(signum, error):
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with signals.StopRequests('a checkpoint') as stop:
    assert not stop.requested
    os.kill(os.getpid(), signum)  # handled between bytecodes: noted, nothing raised
    assert stop.requested
    stopped = stop.stopped('stopped at step 3')
  assert type(stopped) is error and str(stopped) == 'stopped at step 3'
  assert {s: signal.getsignal(s) for s in before} == before


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
