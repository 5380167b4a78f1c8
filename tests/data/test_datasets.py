"""Datasets (kldino/data/datasets.py, digits.py): the digits builder against scikit-learn, sources
read in contiguous shards, image folders, the cache's encoded bytes, and bad inputs refused in one
line.

Everything runs offline in temporary directories. Expected values are computed independently
(numpy, scikit-learn) wherever they can be.
"""
import collections
import math
import pathlib
import re
import socket

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from sklearn import datasets as sklearn_datasets

from kldino.data import datasets, pipeline
from tests.data.helpers import (digits_config, index_coded_source, jpeg, one_line_error,
                                plain_config, read_all, sklearn_split, smooth_image, write_split)
from tests.helpers import config_module

RNG = np.random.default_rng(0)

# --------------------------------------------------------------------------- the digits builder


@pytest.mark.parametrize('split', ['train', 'test'])
def test_digits_builder_matches_sklearn(source, split):
  expected_images, expected_labels = sklearn_split(split)
  examples = read_all(source.read(split))
  assert source.info.num_examples[split] == len(expected_labels)
  np.testing.assert_array_equal(examples['image'], expected_images)
  np.testing.assert_array_equal(examples['label'], expected_labels)
  np.testing.assert_array_equal(examples['index'], np.arange(len(expected_labels)))
  assert examples['image'].dtype == np.uint8 and examples['label'].dtype == np.int32


def test_digits_info(source):
  assert source.info.num_examples == {'train': 1347, 'test': 450}
  assert sum(source.info.num_examples.values()) == len(sklearn_datasets.load_digits().target)
  assert (source.info.num_classes, source.info.num_channels) == (10, 1)


def test_digits_second_source_reuses_the_prepared_data(config, data_dir, source):
  before = sorted(path.name for path in data_dir.rglob('*'))
  assert datasets.get_source(config.data).info == source.info
  assert sorted(path.name for path in data_dir.rglob('*')) == before


def test_building_digits_needs_no_network(tmp_path, monkeypatch):

  def refuse(*args, **kwargs):
    raise AssertionError('the digits builder tried to open a network connection')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)
  config = digits_config(tmp_path)
  assert datasets.get_source(config.data).info.num_examples['test'] == len(sklearn_split('test')[1])


@pytest.mark.parametrize('process_count', [3, 4, 7])
def test_read_gives_each_process_a_contiguous_shard(source, process_count):
  full = read_all(source.read('test'))
  count = len(full['label'])
  per_process = math.ceil(count / process_count)
  seen = []
  for process_index in range(process_count):
    shard = read_all(source.read('test', process_index=process_index, process_count=process_count))
    start = process_index * per_process
    expected = np.arange(start, min(count, start + per_process))
    np.testing.assert_array_equal(shard['index'], expected)
    np.testing.assert_array_equal(shard['image'], full['image'][expected])
    seen.extend(shard['index'])
  np.testing.assert_array_equal(seen, np.arange(count))


def test_read_past_the_end_is_empty():
  source = index_coded_source(RNG, 2)
  assert list(source.read('train', process_index=2, process_count=3)) == []


# --------------------------------------------------------------------------- image folders


def write_folder(root: pathlib.Path, split_sizes: dict, channels: int = 3) -> dict:
  """ROOT/<split>/<class>/<k>.png with random images of varied sizes: {split: [(image, class)]}."""
  written = collections.defaultdict(list)
  for split, per_class in split_sizes.items():
    for label, class_name in enumerate(['cat', 'dog']):
      folder = root / split / class_name
      folder.mkdir(parents=True)
      for k in range(per_class):
        image = RNG.integers(0, 256, (5 + k, 9 - k, channels)).astype(np.uint8)
        (folder / f'{k}.png').write_bytes(tf.io.encode_png(image).numpy())
        written[split].append((image, label))
  return written


def folder_config(path) -> ml_collections.ConfigDict:
  return plain_config(name='folder', path=str(path))


def test_folder_dataset_reads_labels_and_images(tmp_path):
  written = write_folder(tmp_path, {'train': 3, 'test': 2})
  source = datasets.get_source(folder_config(tmp_path).data)
  assert source.info.num_examples == {split: len(items) for split, items in written.items()}
  assert (source.info.num_classes, source.info.num_channels) == (2, 3)
  for split, items in written.items():
    examples = list(source.read(split).as_numpy_iterator())
    expected = {image.tobytes(): (image.shape, label) for image, label in items}
    got = {e['image'].tobytes(): (e['image'].shape, e['label']) for e in examples}
    assert got == expected
    assert [e['index'] for e in examples] == list(range(len(items)))


def test_folder_dataset_batches(tmp_path):
  write_folder(tmp_path, {'train': 3, 'test': 2}, channels=1)
  config = folder_config(tmp_path)
  config.batch_size = 2
  source = datasets.get_source(config.data)
  assert source.info.num_channels == 1
  batches = list(pipeline.train_batches(source, config, epoch=0))
  assert len(batches) == 3 and batches[0]['global_crops'].shape == (2, 2, 16, 16, 1)
  evaluated = list(pipeline.eval_batches(source, 'test', config, batch_size=3))
  assert [batch['mask'].sum() for batch in evaluated] == [3, 1]
  assert evaluated[0]['image'].shape == (3, 8, 8, 1)


def test_a_folder_reads_examples_at_any_positions(tmp_path):
  """read_at gives the examples at the positions, in their order, as read() gives them (the
  same bytes, labels and indices); a source read in order only refuses in one line."""
  images = {f'{"ab"[k % 2]}_{k}.png': smooth_image(8 + k, 8, seed=k) for k in range(5)}
  write_split(tmp_path, 'train', images)
  write_split(tmp_path, 'test', images)
  source = datasets.get_source(plain_config(name='folder', path=str(tmp_path)).data)
  in_order = list(source.read('train', decode=False).as_numpy_iterator())
  positions = [3, 0, 4, 1]
  picked = list(source.read_at('train', positions, decode=False).as_numpy_iterator())
  assert [example['index'] for example in picked] == positions
  for example, position in zip(picked, positions):
    assert example['image'] == in_order[position]['image']
    assert example['label'] == in_order[position]['label']
  one_line_error('reads its examples in order only',
                 index_coded_source(RNG, 4).read_at, 'train', [1, 0])


def test_the_cache_and_shuffle_buffer_hold_encoded_bytes(tmp_path):
  images = {f'a_{k}.jpg': smooth_image(45 + k, 60, seed=k) for k in range(3)}
  write_split(tmp_path, 'train', images)
  write_split(tmp_path, 'test', images)
  config = config_module('digits').get_config()
  config.data.update(dict(name='folder', path=str(tmp_path)))
  source = datasets.get_source(config.data)
  stored = list(source.read('train', decode=False).as_numpy_iterator())
  assert all(isinstance(example['image'], bytes) for example in stored)
  sizes = sorted(len(jpeg(image)) for image in images.values())
  assert sorted(len(example['image']) for example in stored) == sizes
  assert source.info.num_bytes['train'] == pytest.approx(sum(sizes), rel=0.01)
  decoded = list(source.read('train').as_numpy_iterator())
  assert sorted(example['image'].shape for example in decoded) == [(45 + k, 60, 3) for k in range(3)
                                                                  ]


# --------------------------------------------------------------------------- bad inputs


def test_unknown_dataset_name(tmp_path):
  config = plain_config(name='no_such_dataset_xyz', data_dir=str(tmp_path))
  message = one_line_error("unknown dataset 'no_such_dataset_xyz'", datasets.get_source,
                           config.data)
  assert "'digits'" in message and "'folder'" in message


def test_tfds_dataset_not_prepared(tmp_path):
  config = plain_config(name='mnist', data_dir=str(tmp_path))
  one_line_error(re.escape(f'tfds build mnist --data_dir={tmp_path}'), datasets.get_source,
                 config.data)


@pytest.mark.parametrize('path', ['', '/no/such/folder'])
def test_missing_folder(path):
  message = one_line_error('not a folder', datasets.get_source, folder_config(path).data)
  assert f"'{path}'" in message and datasets.FOLDER_LAYOUT in message


def test_folder_without_the_eval_split(tmp_path):
  write_folder(tmp_path, {'train': 2})
  message = one_line_error("split 'test'", datasets.get_source, folder_config(tmp_path).data)
  assert str(tmp_path) in message and datasets.FOLDER_LAYOUT in message


def test_digits_unknown_split_fails_before_building(tmp_path):
  config = plain_config(data_dir=str(tmp_path), train_split='validation')
  one_line_error("split 'validation'", datasets.get_source, config.data)
  assert not any(tmp_path.iterdir())


def test_read_of_an_unknown_split(source):
  one_line_error("unknown split 'validation'", source.read, 'validation')
