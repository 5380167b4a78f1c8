"""kldino/modes: one registration per mode, one module per mode, and the command line built from
them."""
import inspect
import os
import re
import subprocess
import sys

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


def test_help_lists_every_mode_and_the_modes_of_each_flag():
  result = subprocess.run([sys.executable, '-m', 'kldino.main', '--help'],
                          cwd=REPO,
                          capture_output=True,
                          text=True,
                          timeout=120)
  text = ' '.join(result.stdout.split())  # absl's --help exits 1
  for name in modes.MODES:
    assert f'{name}: {modes.MODES.get(name).summary}' in text
  assert '--import_from: import:' in text


def test_the_command_line_and_the_registry_load_neither_jax_nor_tensorflow():
  """--help and flag errors answer before the heavy libraries load."""
  code = ('import sys; import kldino.main; '
          "print(sorted(m for m in ('jax', 'tensorflow', 'flax') if m in sys.modules))")
  result = subprocess.run([sys.executable, '-c', code],
                          cwd=REPO,
                          capture_output=True,
                          text=True,
                          timeout=120)
  assert result.stdout.strip() == '[]', result.stderr[-2000:]
