"""The input pipeline: the digits builder against scikit-learn, sources, sharding, batches, crops.

Everything runs offline in temporary directories. Expected values are computed independently
(numpy, scipy, scikit-learn) wherever they can be.
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
from scipy import ndimage
from sklearn import datasets as sklearn_datasets
from sklearn import model_selection

from kldino.data import augment, datasets, pipeline
from tests.helpers import config_module

RNG = np.random.default_rng(0)


def digits_config(data_dir) -> ml_collections.ConfigDict:
  """The real configs/digits.py, with its data in `data_dir`."""
  config = config_module('digits').get_config()
  config.data.data_dir = str(data_dir)
  return config


def sklearn_split(split: str):
  """The digits split built independently: pixels 0..16 scaled to 0..255 and rounded."""
  digits = sklearn_datasets.load_digits()
  positions = model_selection.train_test_split(np.arange(len(digits.target)),
                                               test_size=0.25,
                                               stratify=digits.target,
                                               random_state=0)
  chosen = positions[0 if split == 'train' else 1]
  images = np.round(digits.images[chosen] * 255 / 16).astype(np.uint8)[..., None]
  return images, digits.target[chosen]


def read_all(dataset) -> dict:
  examples = list(dataset.as_numpy_iterator())
  return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def one_line_error(match: str, make, *args):
  with pytest.raises(ValueError, match=match) as error:
    make(*args)
  assert '\n' not in str(error.value)
  return str(error.value)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def config(data_dir):
  return digits_config(data_dir)


@pytest.fixture(scope='module')
def source(config):
  return datasets.get_source(config.data)


@pytest.fixture(scope='module')
def epoch0(source, config):
  return list(pipeline.train_batches(source, config, epoch=0))


# --------------------------------------------------------------------------- in-memory sources


def array_source(images: np.ndarray,
                 labels: np.ndarray,
                 num_classes: int,
                 split: str = 'train') -> datasets.Source:

  def read_range(split_name, start, stop):
    return tf.data.Dataset.from_tensor_slices({
        'image': images[start:stop],
        'label': labels[start:stop]
    })

  info = datasets.DatasetInfo(num_classes=num_classes,
                              num_channels=images.shape[-1],
                              num_examples={split: len(images)})
  return datasets.Source(info=info, read_range=read_range)


def index_coded_source(num_examples: int, size: int = 8) -> datasets.Source:
  """Images whose first two pixels spell the example's position (high, low byte)."""
  images = RNG.integers(0, 256, (num_examples, size, size, 1)).astype(np.uint8)
  positions = np.arange(num_examples)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = positions // 256, positions % 256
  return array_source(images, (positions % 7).astype(np.int64), num_classes=7)


def decoded_positions(images: np.ndarray) -> np.ndarray:
  pixels = np.round(images * 255).astype(np.int64)  # mean 0, std 1: images are [0, 1]
  return pixels[:, 0, 0, 0] * 256 + pixels[:, 0, 1, 0]


def plain_config(**data_overrides) -> ml_collections.ConfigDict:
  """8x8 views, not normalised; the evaluation view of an 8x8 image is the image itself (resized
  to 8, centre 8x8)."""
  config = digits_config('')
  config.data.update(dict(image_size=8, eval_resize=8, mean=(0.0,), std=(1.0,)))
  config.data.update(data_overrides)
  return config


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
  source = index_coded_source(2)
  assert list(source.read('train', process_index=2, process_count=3)) == []


# --------------------------------------------------------------------------- training batches


def test_train_batches_shapes_and_dtypes(epoch0, source, config):
  aug = config.aug
  expected_steps = pipeline.steps_per_epoch(source.info.num_examples['train'], config.batch_size, 1)
  assert expected_steps == 1347 // 64 == len(epoch0)
  batch = epoch0[0]
  assert set(batch) == {'global_crops', 'local_crops'}
  assert batch['global_crops'].shape == (64, 2, aug.global_size, aug.global_size, 1)
  assert batch['local_crops'].shape == (64, aug.num_local, aug.local_size, aug.local_size, 1)
  low, high = [(value - config.data.mean[0]) / config.data.std[0] for value in (0.0, 1.0)]
  for crops in batch.values():
    assert crops.dtype == np.float32
    assert low - 1e-5 <= crops.min() and crops.max() <= high + 1e-5


def test_train_batches_are_deterministic(epoch0, source, config):
  again = list(pipeline.train_batches(source, config, epoch=0))
  assert len(again) == len(epoch0)
  for first, second in zip(epoch0, again):
    for key in first:
      np.testing.assert_array_equal(first[key], second[key])


def test_train_batches_change_with_the_epoch(epoch0, source, config):
  epoch1 = list(pipeline.train_batches(source, config, epoch=1))
  assert len(epoch1) == len(epoch0)
  assert not np.array_equal(epoch0[0]['global_crops'], epoch1[0]['global_crops'])


def test_resume_from_a_step_gives_the_remaining_batches(epoch0, source, config):
  start_step = 5
  resumed = list(pipeline.train_batches(source, config, epoch=0, start_step=start_step))
  assert len(resumed) == len(epoch0) - start_step
  for expected, got in zip(epoch0[start_step:], resumed):
    for key in expected:
      np.testing.assert_array_equal(expected[key], got[key])


def marked_source(num_examples: int) -> datasets.Source:
  """3-channel images: channel 0 is constant and names the example, the others are noise."""
  images = RNG.integers(0, 256, (num_examples, 8, 8, 3)).astype(np.uint8)
  images[..., 0] = np.arange(num_examples)[:, None, None] * 4
  return array_source(images, np.zeros(num_examples, np.int64), num_classes=1)


def crops_by_example(batches) -> dict:
  """{example: its global crops}; channel 0 of a crop of a constant channel is that constant."""
  found = {}
  for batch in batches:
    for crops in batch['global_crops']:
      found[int(np.round(crops[0, 0, 0, 0] * 255 / 4))] = crops
  return found


def marked_config(batch_size: int) -> ml_collections.ConfigDict:
  config = plain_config(mean=(0.0,) * 3, std=(1.0,) * 3)
  config.batch_size = batch_size
  config.aug.update(
      dict(global_size=8,
           local_size=4,
           num_local=2,
           color_jitter_prob=0.0,
           blur_prob=(1.0, 1.0, 1.0),
           solarize_prob=0.0,
           flip=True))
  return config


def test_crops_do_not_depend_on_the_process_count():
  source, config = marked_source(40), marked_config(batch_size=4)
  single = crops_by_example(pipeline.train_batches(source, config, epoch=3))
  assert len(single) == 40
  for process_index in range(2):
    shard = crops_by_example(
        pipeline.train_batches(source,
                               config,
                               epoch=3,
                               process_index=process_index,
                               process_count=2))
    assert len(shard) == 20
    for example, crops in shard.items():
      np.testing.assert_array_equal(crops, single[example])


def test_fixed_shards_give_the_same_global_batches_on_any_process_count():
  source, config = marked_source(41), marked_config(batch_size=4)
  config.data.shards = 2
  single = list(pipeline.train_batches(source, config, epoch=2))
  parts = [
      list(pipeline.train_batches(source, config, epoch=2, process_index=index, process_count=2))
      for index in range(2)
  ]
  assert len(single) == len(parts[0]) == len(parts[1]) == pipeline.steps_per_epoch(41, 4, 2) == 10
  for whole, first, second in zip(single, *parts):
    for key in whole:  # the global batch is process 0's rows, then process 1's
      np.testing.assert_array_equal(whole[key], np.concatenate([first[key], second[key]]))
  eval_single = list(pipeline.eval_batches(source, 'train', config, batch_size=6))
  eval_parts = [
      list(
          pipeline.eval_batches(source,
                                'train',
                                config,
                                batch_size=6,
                                process_index=index,
                                process_count=2)) for index in range(2)
  ]
  assert len(eval_single) == len(eval_parts[0]) == 7  # shards of 21 and 20 in parts of 3
  for whole, first, second in zip(eval_single, *eval_parts):
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([first[key], second[key]]))
  config.data.shards = 3
  with pytest.raises(ValueError, match='data.shards=3 must be a multiple of the 2 processes'):
    pipeline.train_batches(source, config, epoch=0, process_index=0, process_count=2)


def test_each_epoch_is_a_new_order_of_every_example():
  source, config = marked_source(40), marked_config(batch_size=4)
  orders = [
      list(crops_by_example(pipeline.train_batches(source, config, epoch=epoch)))
      for epoch in range(2)
  ]
  assert sorted(orders[0]) == sorted(orders[1]) == list(range(40))
  assert orders[0] != orders[1]


def test_short_shards_still_run_every_step():
  source, config = marked_source(10), marked_config(batch_size=4)
  steps = pipeline.steps_per_epoch(10, 4, 4)
  for process_index in range(4):  # shards of 3, 3, 3 and 1 examples
    batches = list(
        pipeline.train_batches(source,
                               config,
                               epoch=0,
                               process_index=process_index,
                               process_count=4))
    assert len(batches) == steps == 2


def test_a_small_shard_is_read_once_per_run():
  images = RNG.integers(0, 256, (12, 8, 8, 1)).astype(np.uint8)
  reads = []

  def count(image):
    reads.append(1)
    return image

  def read_range(split, start, stop):
    examples = tf.data.Dataset.from_tensor_slices({
        'image': images[start:stop],
        'label': np.zeros(stop - start, np.int64)
    })
    return examples.map(lambda e: {**e, 'image': tf.numpy_function(count, [e['image']], tf.uint8)})

  info = datasets.DatasetInfo(num_classes=1, num_channels=1, num_examples={'train': 12})
  source, config = datasets.Source(info=info, read_range=read_range), marked_config(4)
  config.data.mean, config.data.std = (0.0,), (1.0,)
  for epoch in range(2):
    assert len(list(pipeline.train_batches(source, config, epoch=epoch))) == 3
  assert len(list(pipeline.eval_batches(source, 'train', config, batch_size=5))) == 3
  assert len(reads) == 12


def test_batch_that_does_not_divide_over_processes_is_rejected():
  one_line_error('multiple of the 3 data shards', pipeline.steps_per_epoch, 100, 64, 3)


# --------------------------------------------------------------------------- evaluation batches


@pytest.mark.parametrize('num_examples,batch_size,process_count', [(450, 64, 1), (450, 66, 3),
                                                                   (450, 64, 4), (2, 3, 3)])
def test_eval_batches_count_each_example_once(num_examples, batch_size, process_count):
  source, config = index_coded_source(num_examples), plain_config()
  local_batch = batch_size // process_count
  expected_batches = pipeline.num_eval_batches(num_examples, batch_size, process_count)
  assert expected_batches == math.ceil(math.ceil(num_examples / process_count) / local_batch)
  positions = []
  for process_index in range(process_count):
    batches = list(
        pipeline.eval_batches(source,
                              'train',
                              config,
                              batch_size=batch_size,
                              process_index=process_index,
                              process_count=process_count))
    assert len(batches) == expected_batches
    for batch in batches:
      assert batch['image'].shape == (local_batch, 8, 8, 1)
      assert (batch['image'].dtype, batch['label'].dtype,
              batch['mask'].dtype) == (np.float32, np.int32, np.bool_)
      assert not batch['image'][~batch['mask']].any()
      real = decoded_positions(batch['image'][batch['mask']])
      np.testing.assert_array_equal(batch['label'][batch['mask']], real % 7)
      positions.extend(real)
  assert sorted(positions) == list(range(num_examples))


def test_eval_batches_of_digits_are_the_split(source):
  config = plain_config()
  images, labels = sklearn_split('test')
  batches = list(pipeline.eval_batches(source, 'test', config, batch_size=64))
  masks = np.concatenate([batch['mask'] for batch in batches])
  got_images = np.concatenate([batch['image'] for batch in batches])[masks]
  got_labels = np.concatenate([batch['label'] for batch in batches])[masks]
  np.testing.assert_array_equal(np.round(got_images * 255).astype(np.uint8), images)
  np.testing.assert_array_equal(got_labels, labels)


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


def test_mean_and_std_must_match_the_channels():
  image = tf.zeros([8, 8, 3])
  one_line_error('one value per channel', augment.center_view, image, 8, (0.5,), (0.5,))


# --------------------------------------------------------------------------- augmentation


def aug_config(**overrides) -> ml_collections.ConfigDict:
  """Everything off: crops of the whole image at its own size, unless overridden."""
  config = ml_collections.ConfigDict(
      dict(global_size=8,
           local_size=8,
           num_local=3,
           global_scale=(1.0, 1.0),
           local_scale=(1.0, 1.0),
           flip=False,
           color_jitter=(0.4, 0.4, 0.2, 0.1),
           color_jitter_prob=0.0,
           grayscale_prob=0.0,
           blur_prob=(0.0, 0.0, 0.0),
           blur_sigma=(0.1, 2.0),
           solarize_prob=0.0,
           crop_interpolation='bicubic'))
  config.update(overrides)
  return config


def random_image(channels: int = 3, size: int = 8) -> np.ndarray:
  return RNG.uniform(0, 1, (size, size, channels)).astype(np.float32)


def crops(image, config, seed=(1, 2), mean=None, std=None) -> dict:
  channels = image.shape[-1]
  mean = (0.0,) * channels if mean is None else mean
  std = (1.0,) * channels if std is None else std
  views = augment.multi_crop(tf.constant(image), tf.constant(seed, tf.int64), config, mean, std)
  return {key: value.numpy() for key, value in views.items()}


def test_multi_crop_shapes_and_determinism():
  image = random_image(size=20)
  config = aug_config(global_size=12,
                      local_size=6,
                      num_local=5,
                      global_scale=(0.4, 1.0),
                      local_scale=(0.05, 0.4),
                      flip=True,
                      color_jitter_prob=0.8,
                      grayscale_prob=0.2,
                      blur_prob=(1.0, 0.1, 0.5),
                      solarize_prob=0.2)
  first = crops(image, config, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
  assert first['global_crops'].shape == (2, 12, 12, 3)
  assert first['local_crops'].shape == (5, 6, 6, 3)
  assert all(np.isfinite(view).all() and view.dtype == np.float32 for view in first.values())
  again = crops(image, config, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
  other = crops(image, config, seed=(1, 3), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first[key], other[key])


def test_no_local_crops():
  views = crops(random_image(1), aug_config(num_local=0, local_size=4))
  assert views['local_crops'].shape == (0, 4, 4, 1)


def test_without_augmentation_every_crop_is_the_normalised_image():
  image, mean, std = random_image(), (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
  views = crops(image, aug_config(), mean=mean, std=std)
  expected = (image - np.array(mean)) / np.array(std)
  for view in np.concatenate([views['global_crops'], views['local_crops']]):
    np.testing.assert_allclose(view, expected, rtol=1e-5, atol=1e-6)


def test_flip_mirrors_some_views():
  image = random_image()
  mirrored = 0
  for seed in range(4):
    views = crops(image, aug_config(flip=True), seed=(seed, 0))
    for view in np.concatenate([views['global_crops'], views['local_crops']]):
      is_mirror = np.allclose(view, image[:, ::-1], atol=1e-6)
      assert is_mirror or np.allclose(view, image, atol=1e-6)
      mirrored += is_mirror
  assert 0 < mirrored < 4 * 5


def test_solarisation_only_on_the_second_global_view():
  image = random_image()
  views = crops(image, aug_config(solarize_prob=1.0))
  solarized = np.where(image < 0.5, image, 1.0 - image)
  np.testing.assert_allclose(views['global_crops'][0], image, atol=1e-6)
  np.testing.assert_allclose(views['global_crops'][1], solarized, atol=1e-6)
  for view in views['local_crops']:
    np.testing.assert_allclose(view, image, atol=1e-6)


def test_grayscale_views_have_equal_channels():
  image = random_image()
  views = crops(image, aug_config(grayscale_prob=1.0))
  luma = image @ np.array([0.2989, 0.5870, 0.1140], np.float32)
  for view in views['global_crops']:
    np.testing.assert_allclose(view, np.repeat(luma[..., None], 3, -1), atol=1e-3)


def test_gaussian_blur_against_scipy():
  views, sigmas, radius = RNG.uniform(0, 1, (2, 12, 12, 3)).astype(np.float32), [0.7, 1.3], 4
  got = augment.gaussian_blur(tf.constant(views), tf.constant(sigmas), radius).numpy()
  for view, blurred, sigma in zip(views, got, sigmas):
    # scipy's 'reflect' mirrors the edge pixel too, as TF's SYMMETRIC padding does.
    expected = ndimage.gaussian_filter(view,
                                       sigma=(sigma, sigma, 0),
                                       mode='reflect',
                                       truncate=radius / sigma)
    np.testing.assert_allclose(blurred, expected, atol=1e-5)


def test_blur_kernel_scales_with_the_view():
  assert augment.blur_radius(224, 2.0) == 6
  assert augment.blur_radius(16, 1.0) == 3
  assert augment.blur_radius(8, 1.0) == 2
  assert augment.blur_radius(2, 1.0) == 1


def test_crop_boxes_follow_the_scale_and_aspect_ranges():
  """Windows in whole pixels (torchvision rounds each side): area and aspect ratio in range up
  to half a pixel on each side."""
  scale, height, width = (0.1, 0.4), 30, 40
  seed = tf.constant([3, 4], tf.int64)
  windows = augment.crop_windows(seed, 500, scale, height, width).numpy()
  top, left, crop_height, crop_width = windows.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + crop_height <= height).all() and (left + crop_width <= width).all()
  low = (crop_height - 0.5) * (crop_width - 0.5) / (height * width)
  high = (crop_height + 0.5) * (crop_width + 0.5) / (height * width)
  assert np.all((high >= scale[0]) & (low <= scale[1]))
  assert np.all(((crop_width + 0.5) / (crop_height - 0.5) >= 3 / 4) &
                ((crop_width - 0.5) / (crop_height + 0.5) <= 4 / 3))


def test_colour_jitter_stays_in_range():
  views = tf.constant(RNG.uniform(0, 1, (6, 8, 8, 3)).astype(np.float32))
  jittered = augment.color_jitter(views, tf.constant([5, 6], tf.int64), (0.4, 0.4, 0.2, 0.1))
  assert jittered.shape == views.shape
  assert 0.0 <= jittered.numpy().min() and jittered.numpy().max() <= 1.0
  assert not np.allclose(jittered, views)


def test_center_view_resizes_and_normalises():
  image = random_image(size=8)
  view = augment.center_view(tf.constant(image), 16, (0.5,) * 3, (0.25,) * 3).numpy()
  assert view.shape == (16, 16, 3)
  same_size = augment.center_view(tf.constant(image), 8, (0.5,) * 3, (0.25,) * 3, resize=8).numpy()
  np.testing.assert_allclose(same_size, (image - 0.5) / 0.25, atol=1e-5)
  with pytest.raises(ValueError, match='eval_resize=7 is smaller than data.image_size=8'):
    augment.center_view(tf.constant(image), 8, (0.5,) * 3, (0.25,) * 3, resize=7)
