"""The input pipeline (kldino/data/pipeline.py): training batches (shapes, determinism, resumption,
the same global batches on any number of processes), evaluation batches that count each example
once, and full-resolution images cropped as PIL crops them.

Everything runs offline in temporary directories. Expected values are computed independently
(numpy, scikit-learn, PIL) wherever they can be.
"""
import dataclasses
import math

import ml_collections
import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kldino.data import augment, datasets, masking, pipeline
from tests.data.helpers import (array_source, decoded_positions, index_coded_source, jpeg_config,
                                jpeg_folder, levels, one_line_error, plain_config, sklearn_split,
                                smooth_image, write_split)
from tests.helpers import config_module

RNG = np.random.default_rng(0)


@pytest.fixture(scope='module')
def epoch0(source, config):
  return list(pipeline.train_batches(source, config, epoch=0))


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


@pytest.mark.parametrize('ibot', [False, True])
def test_fixed_shards_give_the_same_global_batches_on_any_process_count(ibot):
  source, config = marked_source(41), marked_config(batch_size=4)
  config.data.shards = 2
  if ibot:  # iBOT's masks too: each shard's from (seed, epoch, step, shard)
    config.objective.ibot.loss_weight = 1.0
    config.objective.ibot.mask_group_size = 2  # within each process's 2 images
    config.model.patch_size = 2
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


# --------------------------------------------------------------------------- epoch order


def png_folder(root, count: int) -> datasets.Source:
  """A folder source (read by position) of `count` 8x8 PNGs, in one class."""
  write_split(root, 'train', {f'a_{k:03d}.png': smooth_image(8, 8, seed=k) for k in range(count)})
  write_split(root, 'test', {'a_0.png': smooth_image(8, 8)})
  return datasets.get_source(plain_config(name='folder', path=str(root)).data)


def epoch_order(source, config, *, epoch: int, shard: int = 0, shards: int = 1) -> list[int]:
  """The example indices of a data shard in an epoch's training order."""
  examples = pipeline._epoch_examples(  # pylint: disable=protected-access
      source, config, epoch=epoch, shard=shard, shards=shards)
  return [int(example['index']) for example in examples.as_numpy_iterator()]


@pytest.mark.parametrize('kind', ['folder', 'in_order'])
@pytest.mark.parametrize('shards', [1, 3])
def test_permutation_is_every_example_once_per_epoch(tmp_path, kind, shards):
  """data.shuffle='permutation': each data shard's examples once per epoch, the union over the
  shards the split; another order each epoch, the same for the same (seed, epoch). A folder is
  read by position in numpy's permutation of (seed, epoch, shard); a source read in order
  (TFDS, here arrays) through a buffer of its whole shard."""
  num_examples = 40
  source = png_folder(tmp_path, num_examples) if kind == 'folder' else marked_source(num_examples)
  config = plain_config(shuffle='permutation')
  seen = []
  for shard in range(shards):
    start, stop = datasets.shard_range(num_examples, shard, shards)
    order = epoch_order(source, config, epoch=2, shard=shard, shards=shards)
    assert sorted(order) == list(range(start, stop))
    assert order == epoch_order(source, config, epoch=2, shard=shard, shards=shards)
    assert order != epoch_order(source, config, epoch=3, shard=shard, shards=shards)
    if kind == 'folder':
      expected = np.random.default_rng([config.seed, 2, shard]).permutation(stop - start)
      np.testing.assert_array_equal(order, start + expected)
    seen.extend(order)
  assert sorted(seen) == list(range(num_examples))


def test_permutation_reaches_where_a_buffer_cannot():
  """The first example of an epoch is any of the shard's under 'permutation' (here 30 epochs reach
  past the first quarter of 40), and among the first data.shuffle_buffer examples under
  'buffer'."""
  source = marked_source(40)
  firsts = {}
  for shuffle in ('permutation', 'buffer'):
    config = plain_config(shuffle=shuffle, shuffle_buffer=4)
    firsts[shuffle] = [epoch_order(source, config, epoch=epoch)[0] for epoch in range(30)]
  assert max(firsts['buffer']) < 4 and max(firsts['permutation']) >= 10


def test_permutation_of_a_large_source_read_in_order_is_refused():
  """A whole-shard buffer of a source read in order must fit in memory: one line naming
  data.shuffle='buffer'; a folder of any size is permuted by position."""
  source = marked_source(8)
  large = datasets.Source(info=dataclasses.replace(source.info, num_bytes={'train': 2**33}),
                          read_range=source.read_range,
                          name='imagenet2012')
  config = plain_config(shuffle='permutation')
  message = one_line_error("set data.shuffle='buffer'", pipeline.check_shuffle, large, config, 1)
  assert "'imagenet2012' split 'train' takes about 8.0 GiB" in message
  config.data.shuffle = 'buffer'
  pipeline.check_shuffle(large, config, 1)
  config.data.shuffle = 'permutation'
  pipeline.check_shuffle(large, config, 8)  # shards of 1 GiB fit


# --------------------------------------------------------------------------- evaluation batches


@pytest.mark.parametrize('num_examples,batch_size,process_count', [(450, 64, 1), (450, 66, 3),
                                                                   (450, 64, 4), (2, 3, 3)])
def test_eval_batches_count_each_example_once(num_examples, batch_size, process_count):
  source, config = index_coded_source(RNG, num_examples), plain_config()
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


# --------------------------------------------------------------------------- full-resolution images


def plain_aug(config, *, global_size: int, local_size: int, num_local: int):
  config.aug.update(
      dict(global_size=global_size,
           local_size=local_size,
           num_local=num_local,
           global_scale=(0.4, 1.0),
           local_scale=(0.05, 0.4),
           flip=False,
           color_jitter_prob=0.0,
           grayscale_prob=0.0,
           blur_prob=(0.0, 0.0, 0.0),
           solarize_prob=0.0,
           crop_interpolation='bicubic'))  # DINO's, PIL's


def test_pipeline_crops_are_pil_crops_of_the_full_image(tmp_path):
  """train_batches of a 500 x 100 PNG with the augmentation off: both global crops are the
  fallback window (the centre 133 x 100) resized, the local ones the windows of their seeds,
  each equal to PIL's crop + bicubic resize of the full image."""
  image = smooth_image(100, 500)
  write_split(tmp_path, 'train', {'a_0.png': image})
  write_split(tmp_path, 'test', {'a_0.png': image})
  config = config_module('digits').get_config()
  config.data.update(
      dict(name='folder', path=str(tmp_path), image_size=32, mean=(0.0,) * 3, std=(1.0,) * 3))
  plain_aug(config, global_size=32, local_size=16, num_local=4)
  config.batch_size = 1
  source = datasets.get_source(config.data)
  batch = next(pipeline.train_batches(source, config, epoch=0))
  pil = Image.fromarray(image)
  expected = np.asarray(pil.crop((183, 0, 316, 100)).resize((32, 32), Image.BICUBIC), np.float32)
  for view in batch['global_crops'][0]:
    # TF's antialiased bicubic vs PIL's (which rounds to uint8 between its two passes): at most
    # 2 levels on smooth content, 0.3 on average (measured 1.5 and 0.30).
    assert np.abs(levels(view) - expected).max() <= 2.0
  seed = pipeline._example_seed(config, 0, tf.constant(0, tf.int64))
  local_seed = augment._group_seeds(seed, 1)[0]
  windows = augment.crop_windows(local_seed, 4, (0.05, 0.4), 100, 500).numpy()
  for view, (top, left, crop_height, crop_width) in zip(batch['local_crops'][0], windows):
    expected = pil.crop((left, top, left + crop_width, top + crop_height)).resize((16, 16),
                                                                                  Image.BICUBIC)
    difference = np.abs(levels(view) - np.asarray(expected, np.float32))
    assert difference.max() <= 2.0 and difference.mean() < 0.6


def test_jpeg_epochs_are_deterministic_and_resume_exactly(tmp_path):
  jpeg_folder(tmp_path)
  config = jpeg_config(tmp_path)
  source = datasets.get_source(config.data)
  epoch = list(pipeline.train_batches(source, config, epoch=1))
  assert len(epoch) == 3
  again = list(pipeline.train_batches(source, config, epoch=1))
  resumed = list(pipeline.train_batches(source, config, epoch=1, start_step=1))
  assert len(resumed) == 2
  for expected, got in zip(epoch, again):
    for key in expected:
      np.testing.assert_array_equal(expected[key], got[key])
  for expected, got in zip(epoch[1:], resumed):
    for key in expected:
      np.testing.assert_array_equal(expected[key], got[key])
  other = list(pipeline.train_batches(source, config, epoch=2))
  assert not np.array_equal(epoch[0]['global_crops'], other[0]['global_crops'])


@pytest.mark.parametrize('small', [False, True])
def test_batch_xla_and_per_example_augmentation_give_the_same_batches(tmp_path, small):
  """aug.xla_min_size chooses where the augmentation runs (XLA on whole batches, or tf.data
  example by example): with every random choice made certain (probabilities 0 or 1, one blur
  sigma) the batches agree to float rounding, on JPEGs and on the digits. (Their random draws
  differ: XLA's Philox streams are not TF's CPU kernels', so the same seed draws other factors
  on each path, each path deterministic.)"""
  if small:
    config = config_module('digits').get_config()
    config.data.data_dir = str(tmp_path)
    config.batch_size = 16
  else:
    jpeg_folder(tmp_path)
    config = jpeg_config(tmp_path)
  config.aug.update(
      dict(flip=False,
           color_jitter_prob=1.0,
           grayscale_prob=0.0,
           blur_prob=(1.0, 0.0, 1.0),
           blur_sigma=(0.7, 0.7),
           solarize_prob=1.0,
           color_jitter=(0.0, 0.0, 0.0, 0.0)))
  source = datasets.get_source(config.data)
  by_mode = {}
  for xla_min_size in (0, 10_000):
    config.aug.xla_min_size = xla_min_size
    by_mode[xla_min_size] = next(pipeline.train_batches(source, config, epoch=3))
  for key in ('global_crops', 'local_crops'):
    assert by_mode[0][key].shape == by_mode[10_000][key].shape
    np.testing.assert_allclose(by_mode[0][key], by_mode[10_000][key], atol=2e-5)


def test_ibot_masks_resume_and_follow_the_block_masking():
  source, config = marked_source(41), marked_config(batch_size=8)
  config.objective.ibot.loss_weight = 1.0
  config.model.patch_size = 1  # an 8 x 8 patch grid
  batches = list(pipeline.train_batches(source, config, epoch=1))
  masks = np.stack([batch['masks'] for batch in batches])
  assert masks.shape == (len(batches), 8, 2, 64) and masks.dtype == bool
  # Half the global crops of every batch masked, the others not; never more than the bound.
  assert (masks.any(-1).sum((1, 2)) == 8).all()
  group = masking.group_size(config, jax.device_count())  # one device's images: 1 of 8 here
  bounds = masks.reshape(len(batches), 8 // group, -1).sum(-1)
  assert (bounds <= masking.group_bound(config, group)).all()
  assert not np.array_equal(masks[0], masks[1])  # a new draw every step
  resumed = list(pipeline.train_batches(source, config, epoch=1, start_step=3))
  np.testing.assert_array_equal(np.stack([batch['masks'] for batch in resumed]), masks[3:])


@pytest.mark.parametrize('xla_min_size', [0, 10_000])
def test_gram_crops_are_the_global_crops_windows_and_flips_undistorted(tmp_path, xla_min_size):
  """DINOv3's Gram teacher crops: with the colour distortions off, at the global size they are
  the global crops themselves (the same windows, the same flips), on either augmentation path;
  at twice the size, the same windows at twice the resolution."""
  jpeg_folder(tmp_path)
  config = jpeg_config(tmp_path)
  plain_aug(config, global_size=16, local_size=8, num_local=2)
  config.aug.xla_min_size = xla_min_size
  config.gram.use = True
  source = datasets.get_source(config.data)
  unflipped = next(pipeline.train_batches(source, config, epoch=0))['gram_crops']
  config.aug.flip = True
  batches = list(pipeline.train_batches(source, config, epoch=0))
  for batch in batches:
    np.testing.assert_allclose(batch['gram_crops'], batch['global_crops'], atol=2e-5)
  mirrored = [
      np.allclose(got, expected[:, ::-1], atol=2e-5) and not np.allclose(got, expected, atol=2e-5)
      for got, expected in zip(batches[0]['gram_crops'].reshape(-1, 16, 16, 3),
                               unflipped.reshape(-1, 16, 16, 3))
  ]
  assert 0 < sum(mirrored) < len(mirrored)  # some views flipped, the same in both crops
  config.gram.teacher_resolution_scale = 2.0
  batch = next(pipeline.train_batches(source, config, epoch=0))
  assert batch['gram_crops'].shape == (4, 2, 32, 32, 3)
  pooled = batch['gram_crops'].reshape(4, 2, 16, 2, 16, 2, 3).mean(axis=(3, 5))
  assert np.abs(pooled - batches[0]['global_crops']).mean() < 0.05
