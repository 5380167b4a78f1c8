"""The package is laid out by role (README, "Layout"): the folders and few top-level modules, one
docstring line per folder, and no import running from the lower floors up."""
import ast
import os

from tests.helpers import REPO

PACKAGE = os.path.join(REPO, 'kldino')
ROLES = ('config', 'core', 'data', 'evaluate', 'models', 'modes', 'runtime', 'tools')
# What the lower floors never import.
ABOVE = ('kldino.modes', 'kldino.tools', 'kldino.train', 'kldino.main')


def _imports(path):
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f'{node.module}.{alias.name}' for alias in node.names)


def test_the_folders_are_the_roles_and_few_modules_tie_them_together():
  entries = os.listdir(PACKAGE)
  folders = sorted(e for e in entries if os.path.isfile(os.path.join(PACKAGE, e, '__init__.py')))
  modules = sorted(e for e in entries if e.endswith('.py') and e != '__init__.py')
  assert folders == sorted(ROLES)
  assert len(modules) <= 9, modules
  for role in ROLES:
    docstring = ast.get_docstring(ast.parse(
        open(os.path.join(PACKAGE, role, '__init__.py')).read()))
    assert docstring and '\n' not in docstring, role


def test_core_models_and_data_import_nothing_above_them():
  for role in ('core', 'models', 'data'):
    for name in os.listdir(os.path.join(PACKAGE, role)):
      if name.endswith('.py'):
        upward = [
            module for module in _imports(os.path.join(PACKAGE, role, name))
            if module.startswith(ABOVE)
        ]
        assert not upward, (role, name, upward)
