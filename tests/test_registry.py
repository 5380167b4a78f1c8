"""kldino/registry.py: one registry class for every kind of named thing; it refuses duplicates and
names the choices."""
import pytest

from kldino.registry import Registry


def test_registry_refuses_duplicates_and_names_the_choices():
  registry = Registry('thing', key='things.type')
  registry.register('a')(object)
  with pytest.raises(ValueError, match="'a' is registered twice"):
    registry.register('a')(object)
  with pytest.raises(ValueError, match="unknown things.type 'b': choose one of a"):
    registry.get('b')
  assert 'a' in registry and list(registry) == ['a']
