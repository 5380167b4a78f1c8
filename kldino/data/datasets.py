"""Dataset sources by name: the embedded `digits`, a folder of images, or any prepared TFDS dataset.

A source knows its `DatasetInfo` and reads one process's shard of a split in a fixed order, as
{'image': uint8 [H, W, C], 'label': int32, 'index': int64}, `index` being the example's position
in the split; with decode=False the image comes as the source stores it: the encoded bytes (a
scalar tf.string: JPEG, PNG...) for TFDS datasets and folders, so that the pipeline can cut its
crops from the full-resolution image and decode only what it needs (kldino/data/augment.py).
Shards are contiguous: process p of P reads [p * ceil(N/P), (p + 1) * ceil(N/P)).
Nothing here downloads: `digits` is built from scikit-learn's copy, other TFDS datasets must be
prepared beforehand. Every check runs before anything expensive.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Iterable, Mapping

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from kldino.data import augment
from kldino.data import digits
from kldino.data import unreadable
from kldino.registry import Registry

FOLDER_LAYOUT = 'ROOT/<split>/<class>/<image>.(png|jpg|jpeg)'

# Read the files one after another so that positions follow the split's stored order.
_IN_ORDER = tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_channels: int
  num_examples: Mapping[str, int]  # per split
  # Per split, about how many bytes its images take as read (encoded); absent when unknown.
  num_bytes: Mapping[str, int] = dataclasses.field(default_factory=dict)
  # (height, width) of every image when the dataset fixes it (the digits: (8, 8)), else None.
  image_shape: tuple[int, int] | None = None


def shard_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, stop) of the examples that process `process_index` of `process_count` reads."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, {process_count}): '
                     'pass the index of this process among process_count')
  per_process = -(-num_examples // process_count)
  start = min(num_examples, process_index * per_process)
  return start, min(num_examples, start + per_process)


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity: pipelines cache per source
class Source:
  info: DatasetInfo
  # (split, start, stop) -> examples [start, stop) of the split as {'image', 'label'}; stop > start.
  # 'image' is uint8 [H, W, C] or its encoded bytes (a scalar tf.string).
  read_range: Callable[[str, int, int], tf.data.Dataset]
  # (split, count) -> the absolute paths of the split's first `count` images, for sources that
  # read files; None: images are named by their dataset key (`name:split[index]`).
  read_paths: Callable[[str, int], list[str]] | None = None
  # (split, positions) -> the examples at those positions of the split, in that order, as
  # read_range gives them: sources with random access (files); None: read in order only.
  read_positions: Callable[[str, np.ndarray], tf.data.Dataset] | None = None
  name: str = ''
  # The images the pipelines could not decode, and skipped (kldino/data/unreadable.py).
  unreadable: unreadable.Tally = dataclasses.field(default_factory=unreadable.Tally)

  def file_names(self, split: str, count: int) -> list[str]:
    """Names of the first `count` images of a split: file paths, or dataset keys."""
    count = min(count, self.num_examples(split))
    if self.read_paths is not None:
      return self.read_paths(split, count)
    return [f'{self.name}:{split}[{index}]' for index in range(count)]

  def names(self, split: str, indices) -> list[str]:
    """Names of the images at `indices` of a split."""
    indices = list(indices)
    names = self.file_names(split, max(indices, default=-1) + 1)
    return [names[index] for index in indices]

  def num_examples(self, split: str) -> int:
    if split not in self.info.num_examples:
      raise ValueError(f"unknown split '{split}': this dataset has "
                       f'{sorted(self.info.num_examples)}; use one of those')
    return self.info.num_examples[split]

  def read(self,
           split: str,
           *,
           process_index: int = 0,
           process_count: int = 1,
           decode: bool = True) -> tf.data.Dataset:
    """This process's shard of a split, images decoded, or as stored when decode=False."""
    start, stop = shard_range(self.num_examples(split), process_index, process_count)
    if start == stop:  # a process past the end; TFDS cannot read an empty range
      examples = self.read_range(split, 0, 1).take(0)
    else:
      examples = self.read_range(split, start, stop)
    return examples.enumerate(start).map(
        functools.partial(_as_example, num_channels=self.info.num_channels, decode=decode))

  def read_at(self, split: str, positions, *, decode: bool = True) -> tf.data.Dataset:
    """The examples at `positions` of a split, in that order, as `read` gives them; only for
    sources with random access (read_positions)."""
    if self.read_positions is None:
      raise ValueError(f"the '{self.name}' source reads its examples in order only: read it with "
                       'read(), or shuffle it through a buffer')
    positions = np.asarray(positions, np.int64)
    examples = self.read_positions(split, positions)
    indexed = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(positions), examples)
    return indexed.map(
        functools.partial(_as_example, num_channels=self.info.num_channels, decode=decode))


def _as_example(index, example, *, num_channels: int, decode: bool) -> dict:
  image = example['image']
  if image.dtype == tf.string and decode:
    image = augment.decode(image, num_channels)
  if image.dtype != tf.string:
    image = tf.ensure_shape(image, [None, None, num_channels])
  return {'image': image, 'label': tf.cast(example['label'], tf.int32), 'index': index}


# --------------------------------------------------------------------------- the registry

# data.name -> make_source(data_config) -> Source; any other name is a prepared TFDS dataset.
SOURCES = Registry('data source', key='data.name')


def host_only_tensorflow():
  """Hide GPUs from TensorFlow, which only feeds the host, before it initialises them."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # initialised by someone else first; nothing left to do but say so
    logging.warning('TensorFlow was initialised before kldino read data: it may hold GPU memory')


def get_source(data_config) -> Source:
  """The source for `data_config.name`; any name not registered is a prepared TFDS dataset."""
  host_only_tensorflow()
  name = data_config.name
  make_source = SOURCES.get(name) if name in SOURCES else _prepared_tfds_source
  return make_source(data_config)


def _data_dir(data_config) -> str | None:
  return data_config.data_dir or None  # None: TFDS's default directory


def _check_splits(available: Iterable[str], data_config, where: str):
  available = sorted(available)
  for key in ('train_split', 'eval_split'):
    split = data_config[key]
    if split not in available:
      raise ValueError(f"split '{split}' (data.{key}) is not in {where}: its splits are "
                       f'{available}; set --config.data.{key}')


# --------------------------------------------------------------------------- TFDS builders


def _stores_encoded_images(builder) -> bool:
  """Whether the builder's images are stored encoded and can be read so (uint8 tfds Image)."""
  image = builder.info.features['image']
  return isinstance(image, tfds.features.Image) and image.np_dtype == np.uint8


def _read_tfds_range(builder, split: str, start: int, stop: int) -> tf.data.Dataset:
  decoders = {'image': tfds.decode.SkipDecoding()} if _stores_encoded_images(builder) else None
  return builder.as_dataset(split=f'{split}[{start}:{stop}]',
                            shuffle_files=False,
                            read_config=_IN_ORDER,
                            decoders=decoders)


def _tfds_source(builder) -> Source:
  splits = builder.info.splits
  shape = builder.info.features['image'].shape
  info = DatasetInfo(num_classes=builder.info.features['label'].num_classes,
                     num_channels=shape[-1],
                     num_examples={
                         name: split.num_examples for name, split in splits.items()
                     },
                     num_bytes={
                         name: split.num_bytes for name, split in splits.items() if split.num_bytes
                     },
                     image_shape=tuple(shape[:2]) if None not in shape[:2] else None)
  return Source(info=info,
                read_range=functools.partial(_read_tfds_range, builder),
                name=builder.info.name)


def _prepare_digits(data_dir: str | None):
  """The `digits` builder, prepared into `data_dir` on first use (about a second, offline)."""
  builder = digits.Digits(data_dir=data_dir)
  if builder.is_prepared():
    return builder
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False))
  except OSError:
    # Another process may have finished preparing the same directory first: its copy is as good.
    if not digits.Digits(data_dir=data_dir).is_prepared():
      raise
  return digits.Digits(data_dir=data_dir)  # reads the info written by whoever prepared it


@SOURCES.register('digits')
def _digits_source(data_config) -> Source:
  _check_splits(digits.SPLITS, data_config, "the 'digits' dataset")
  return _tfds_source(_prepare_digits(_data_dir(data_config)))


def _prepared_tfds_source(data_config) -> Source:
  name, data_dir = data_config.name, _data_dir(data_config)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except ValueError:  # DatasetNotFoundError, or a name TFDS cannot parse
    raise ValueError(f"unknown dataset '{name}': use 'digits', 'folder' (with data.path) or a "
                     'TFDS dataset name prepared in data.data_dir') from None
  if not builder.is_prepared():
    where = data_dir or tfds.core.constants.DATA_DIR
    raise ValueError(f"TFDS dataset '{name}' is not prepared in {where} and kldino never "
                     f'downloads: prepare it first with `tfds build {name} --data_dir={where}`')
  features = builder.info.features
  if not {'image', 'label'} <= set(features.keys()):
    raise ValueError(f"TFDS dataset '{name}' has features {sorted(features.keys())}: kldino needs "
                     "an image classification dataset with 'image' and 'label'")
  _check_splits(builder.info.splits.keys(), data_config, f"TFDS dataset '{name}'")
  return _tfds_source(builder)


# --------------------------------------------------------------------------- image folders


def _folder_files(builder, split: str) -> tuple[list[str], list[int]]:
  """(paths, labels) of a split in ImageFolder's order (what its as_dataset reads). ImageFolder
  has no public list of them; its `_split_examples` (tfds 4.9.10, pinned) is read directly so
  that a shard opens its own files only, instead of reading and skipping those before it."""
  examples = builder._split_examples[split]  # pylint: disable=protected-access
  labels = builder.info.features['label']
  return ([example.image_path for example in examples],
          [labels.str2int(example.label) for example in examples])


def _folder_channels(paths: list[str], sample: int = 32, tries: int = 1024) -> int:
  """1 when the first `sample` images that decode (of the first `tries`) are all grayscale (with
  or without alpha), else 3: every image is decoded to that many channels (a few grayscale files
  in a colour dataset, as ImageNet has, become RGB)."""
  decoded = 0
  for path in paths[:tries]:
    if decoded == sample:
      break
    try:
      channels = tf.io.decode_jpeg(tf.io.read_file(path)).shape[-1]
    except tf.errors.InvalidArgumentError:  # corrupt: the pipeline skips it (unreadable.py)
      continue
    if channels >= 3:
      return 3
    decoded += 1
  if decoded:
    return 1
  split_folder = os.path.dirname(os.path.dirname(paths[0]))
  raise ValueError(f'none of the first {min(tries, len(paths))} images in {split_folder} can be '
                   'decoded: check that the folder holds PNG or JPEG images')


def _folder_bytes(paths: list[str], sample: int = 64) -> int:
  """About the bytes of a split's files: the mean size of the first `sample` times their count."""
  sizes = [tf.io.gfile.stat(path).length for path in paths[:sample]]
  return round(sum(sizes) / max(1, len(sizes)) * len(paths))


def _indexable(paths: list[str], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """A split's paths and labels as arrays that a permutation indexes: the paths as the same
  Python strings (dtype object; a fixed-width unicode array of ImageNet's is 4x larger)."""
  return np.asarray(paths, dtype=object), np.asarray(labels, np.int64)


def _read_file(path, label) -> dict:
  return {'image': tf.io.read_file(path), 'label': label}


def _read_files(paths: np.ndarray, labels: np.ndarray) -> tf.data.Dataset:
  return tf.data.Dataset.from_tensor_slices(
      (paths, labels)).map(_read_file, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _read_folder_range(files: dict, split: str, start: int, stop: int) -> tf.data.Dataset:
  """The encoded bytes of files [start, stop) of a split, in order."""
  paths, labels = files[split]
  return _read_files(paths[start:stop], labels[start:stop])


def _read_folder_positions(files: dict, split: str, positions: np.ndarray) -> tf.data.Dataset:
  """The encoded bytes of a split's files at `positions`, in that order."""
  paths, labels = files[split]
  return _read_files(paths[positions], labels[positions])


def _folder_paths(files: dict, split: str, count: int) -> list[str]:
  """Absolute paths of a split's first images: ROOT/<split>/<class>/<file name>."""
  return [str(os.path.abspath(path)) for path in files[split][0][:count]]


@SOURCES.register('folder')
def _folder_source(data_config) -> Source:
  root = data_config.path
  if not root or not tf.io.gfile.isdir(root):
    raise ValueError(f"data.path='{root}' is not a folder: data.name='folder' reads "
                     f'{FOLDER_LAYOUT}; set --config.data.path=ROOT')
  builder = tfds.ImageFolder(root)
  num_examples = {
      name: split.num_examples
      for name, split in builder.info.splits.items()
      if split.num_examples > 0
  }
  _check_splits(num_examples, data_config, f'the folder {root} (layout {FOLDER_LAYOUT})')
  files = {split: _indexable(*_folder_files(builder, split)) for split in num_examples}
  info = DatasetInfo(num_classes=builder.info.features['label'].num_classes,
                     num_channels=_folder_channels(files[data_config.train_split][0]),
                     num_examples=num_examples,
                     num_bytes={
                         split: _folder_bytes(paths) for split, (paths, _) in files.items()
                     })
  return Source(info=info,
                read_range=functools.partial(_read_folder_range, files),
                read_paths=functools.partial(_folder_paths, files),
                read_positions=functools.partial(_read_folder_positions, files),
                name='folder')
