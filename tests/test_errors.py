"""kldino/errors.py: one table of failures, with exit codes, that docs/failures.md lists."""
import os
import re

from kldino import errors
from tests.helpers import REPO


def test_every_error_has_its_own_kind_and_a_documented_exit_code():
  with open(os.path.join(REPO, 'docs', 'failures.md')) as f:
    rows = [line for line in f if re.match(r'\| \d+ \| `', line)]
  documented = {}
  for row in rows:
    code = int(row.split('|')[1])
    for name in re.findall(r'`(\w+)`', row.split('|')[2]):
      documented[name] = code
  assert documented == {error.__name__: error.exit_code for error in errors.ERRORS}
  assert len({error.kind for error in errors.ERRORS}) == len(errors.ERRORS)


def test_the_failures_a_command_reports_are_kldino_errors():
  for error in errors.ERRORS:
    assert issubclass(error, errors.KldinoError)
  # What catches a ValueError of a config check also catches a config error, as before.
  assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.DataError,
                                                                   errors.ConfigError)
  assert errors.Interrupted.exit_code == 130 and errors.Preempted.exit_code == 0
