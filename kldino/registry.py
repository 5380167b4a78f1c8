"""Named things chosen by a config value: one small registry class for every kind.

    EVALUATORS = Registry('evaluator', key='evals.*.type')

    @EVALUATORS.register('knn')
    class KnnEvaluator: ...

    EVALUATORS.get('knn')  # the class; an unknown name -> ValueError naming the choices

A name registered twice is refused, so two modules can never silently replace each other.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator


class Registry:
  """Names -> objects of one kind (`what`), looked up by the config key `key`."""

  def __init__(self, what: str, *, key: str):
    self.what = what
    self.key = key
    self._entries: dict[str, Any] = {}

  def register(self, name: str) -> Callable[[Any], Any]:

    def add(entry):
      if name in self._entries:
        raise ValueError(f"{self.what} '{name}' is registered twice: pick another name")
      self._entries[name] = entry
      return entry

    return add

  def get(self, name: str):
    if name not in self._entries:
      raise ValueError(f"unknown {self.key} '{name}': choose one of {', '.join(self.names())}")
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())
