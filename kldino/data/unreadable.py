"""Images that cannot be decoded: skipped, counted and named; too many of a split stop the run.

One corrupt file in a million-image folder should cost a warning, not the job; a folder of them
should stop the job with one line. The pipeline maps examples to views with `tolerant_map`: the
map is followed by tf.data's ignore_errors, which drops an example whose view fails (its decoding)
at no cost to the others, and costs nothing per example where nothing fails. To know which
examples were dropped, each example carries its position in the stream and the indices of the
`RECENT` examples up to it (a scan before the map); a scan after the map sees the gap in the
positions at the next example that survived and reports the dropped indices to the source's
`Tally` (a Python call, made only when something was dropped). Gaps longer than RECENT are
counted in full and named in part.
"""
from __future__ import annotations

import dataclasses
import threading

from absl import logging
import numpy as np
import tensorflow as tf

from kldino.errors import TooManyUnreadable

RECENT = 16
_NAMED = 5  # unreadable images named in warnings and errors, per split


@dataclasses.dataclass
class Tally:
  """The images of each split that could not be decoded, as the pipelines met them: their
  indices (each counted once however often it is read) and the drops in runs too long to name."""
  indices: dict[str, dict[int, None]] = dataclasses.field(default_factory=dict)  # ordered sets
  unnamed: dict[str, int] = dataclasses.field(default_factory=dict)
  warned: set[tuple[str, int]] = dataclasses.field(default_factory=set)
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  def add(self, split: str, count: int, indices) -> None:
    """`count` images of `split` were dropped; `indices` are those of some of them."""
    indices = [int(index) for index in indices if index >= 0]
    with self._lock:
      self.indices.setdefault(split, {}).update(dict.fromkeys(indices))
      self.unnamed[split] = self.unnamed.get(split, 0) + count - len(indices)

  def warn(self, split: str, names) -> None:
    """Log a warning naming each of the split's first _NAMED unreadable images, once each;
    `names(indices)` gives their names."""
    with self._lock:
      first = list(self.indices.get(split, {}))[:_NAMED]
      new = [index for index in first if (split, index) not in self.warned]
      self.warned.update((split, index) for index in new)
    for name in names(new):
      logging.warning("skipping an image of split '%s' that cannot be decoded: %s", split, name)

  def count(self, split: str) -> int:
    with self._lock:
      return len(self.indices.get(split, {})) + self.unnamed.get(split, 0)

  def check(self, split: str, num_examples: int, max_fraction: float, names) -> None:
    """Raise TooManyUnreadable when more than `max_fraction` of the split's `num_examples` images
    could not be decoded; `names(indices)` gives the images' names for the message."""
    count = self.count(split)
    if count > max_fraction * num_examples:
      with self._lock:
        named = list(self.indices.get(split, {}))[:_NAMED]
      raise TooManyUnreadable(
          f"{count} of the {num_examples} images of split '{split}' cannot be decoded (more "
          f'than data.max_corrupt_fraction={max_fraction:g} of them), e.g. '
          f"{', '.join(names(named)) or 'none named'}: replace or remove them, or raise "
          'data.max_corrupt_fraction')


def _numbered(examples: tf.data.Dataset) -> tf.data.Dataset:
  """Each example with '_position' (its place in the stream) and '_recent' (the indices of the
  RECENT examples up to it, itself last; -1 before the first)."""

  def push(state, example):
    position, recent = state
    recent = tf.concat([recent[1:], tf.reshape(tf.cast(example['index'], tf.int64), [1])], 0)
    return (position + 1, recent), {**example, '_position': position, '_recent': recent}

  start = (tf.constant(0, tf.int64), tf.fill([RECENT], tf.constant(-1, tf.int64)))
  return examples.scan(start, _untraced(push))


def _reported_gaps(tally: Tally, split: str):
  """The scan after the map: reports the examples missing between two that survived."""

  def report(gap, recent):
    gap = int(gap)
    tally.add(split, gap, recent.numpy()[max(0, RECENT - 1 - gap):RECENT - 1])
    return np.int64(0)

  def note(expected, view):
    position, recent = view.pop('_position'), view.pop('_recent')
    gap = position - expected
    reported = tf.cond(gap > 0, lambda: tf.py_function(report, [gap, recent], tf.int64),
                       lambda: tf.constant(0, tf.int64))
    with tf.control_dependencies([reported]):
      return tf.identity(position + 1), view

  return note


def tolerant_map(examples: tf.data.Dataset,
                 view,
                 *,
                 tally: Tally,
                 split: str,
                 end_marker: dict | None = None) -> tf.data.Dataset:
  """examples.map(view) in order, in parallel, without the examples whose view fails (images
  that cannot be decoded): those are reported to `tally`. `view` returns a dict.

  A finite stream needs `end_marker`, an example (index -1) whose view cannot fail: it is mapped
  after the last one, so that failures at the end are seen too, and then left out."""
  if end_marker is not None:
    examples = examples.concatenate(tf.data.Dataset.from_tensors(end_marker))

  def bookkept_view(example):
    bookkeeping = {key: example.pop(key) for key in ('_position', '_recent')}
    return {**view(example), **bookkeeping, '_index': example['index']}

  views = _numbered(examples).map(_untraced(bookkept_view),
                                  num_parallel_calls=tf.data.AUTOTUNE,
                                  deterministic=True).ignore_errors()
  views = views.scan(tf.constant(0, tf.int64), _untraced(_reported_gaps(tally, split)))
  if end_marker is not None:
    views = views.filter(_untraced(lambda view: view['_index'] >= 0))
  return views.map(
      _untraced(lambda view: {
          key: value for key, value in view.items() if key != '_index'
      }))


def _untraced(fn):
  return tf.autograph.experimental.do_not_convert(fn)
