"""kldino/modes: one registration per mode, one module per mode, each run taking its flags (the
command line built from them: tests/e2e/test_cli.py)."""
import inspect
import os
import re

from kldino import modes
from tests.helpers import REPO


def test_each_mode_is_registered_once_and_its_run_takes_its_flags():
  with open(os.path.join(REPO, 'kldino', 'modes', '__init__.py')) as f:
    registered = re.findall(r"_register\('(\w+)'", f.read())
  assert sorted(registered) == modes.MODES.names() and len(set(registered)) == len(registered)
  for name in modes.MODES:
    mode = modes.MODES.get(name)
    parameters = inspect.signature(mode.load()).parameters
    assert list(parameters)[:2] == ['config', 'workdir'], name
    assert set(list(parameters)[2:]) == set(mode.flags), name
    assert set(mode.required) <= set(mode.flags)
    assert bool(mode.output) == ('output' in mode.flags), name
