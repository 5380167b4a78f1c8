"""Host batches: augmented multi-crop batches for training, padded and masked ones for evaluation.

Training order is a pure function of (seed, epoch, process): each process shuffles its own shard
with a seed from (seed, epoch), and augments each example with a seed from (seed, epoch, index),
so that a resumed run (`start_step`) sees exactly the batches an uninterrupted run would have.
Evaluation reads every example of a split exactly once over all processes; every process yields
the same number of batches (padding masked out) so that collectives never wait on a process.

Examples are resized to `data.image_size` (kept as uint8) as soon as they are read, so that the
shuffle buffer (at most `data.shuffle_buffer` examples) and the cache hold small images. A shard
that fits in `_CACHE_BYTES` is cached in memory: a small dataset is read and decoded once per run
instead of once per epoch and per sweep.
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import tensorflow as tf

from kldino.data import augment
from kldino.data.datasets import Source, shard_range

_CACHE_BYTES = 2 * 2**30  # per process: the resized shard of a small dataset, kept across epochs


def _local_batch(global_batch: int, process_count: int) -> int:
  if global_batch < process_count or global_batch % process_count:
    raise ValueError(f'batch size {global_batch} must be a positive multiple of the '
                     f'{process_count} processes (each takes an equal part): change it')
  return global_batch // process_count


def steps_per_epoch(num_train_examples: int, global_batch: int, process_count: int) -> int:
  """Steps that every process runs in an epoch; the remainder of the data is dropped."""
  return (num_train_examples // process_count) // _local_batch(global_batch, process_count)


def num_eval_batches(num_examples: int, batch_size: int, process_count: int) -> int:
  """Batches that every process yields for a split: enough for the largest shard."""
  largest_shard = -(-num_examples // process_count)
  return -(-largest_shard // _local_batch(batch_size, process_count))


def _float01(image_uint8) -> tf.Tensor:
  return tf.image.convert_image_dtype(image_uint8, tf.float32)


def _resized(example, *, size: int) -> dict:
  image = augment.resize(_float01(example['image']), size)
  return {**example, 'image': tf.cast(tf.round(image * 255), tf.uint8)}


@functools.lru_cache(maxsize=16)
def _shard(source: Source, split: str, process_index: int, process_count: int, image_size: int,
           in_memory: bool) -> tf.data.Dataset:
  """One process's examples of a split, resized; the same object each time, so its cache lasts."""
  examples = source.read(split, process_index=process_index, process_count=process_count)
  examples = examples.map(functools.partial(_resized, size=image_size),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return examples.cache() if in_memory else examples


def _shard_size(source: Source, split: str, process_index: int, process_count: int) -> int:
  start, stop = shard_range(source.num_examples(split), process_index, process_count)
  return stop - start


def _examples(source: Source, split: str, config, process_index: int,
              process_count: int) -> tf.data.Dataset:
  image_size = config.data.image_size
  shard_bytes = (_shard_size(source, split, process_index, process_count)
                 * image_size ** 2 * source.info.num_channels)
  return _shard(source, split, process_index, process_count, image_size,
                shard_bytes <= _CACHE_BYTES)


def _shuffle_seed(seed: int, epoch: int) -> int:
  # tf.data takes one integer: mix (seed, epoch) so that neighbouring epochs are unrelated.
  return int(np.random.SeedSequence([seed % 2**32, epoch]).generate_state(1)[0])


def _crops(example, *, config, epoch: int) -> dict:
  seed = tf.random.experimental.stateless_fold_in(
      tf.constant([config.seed, epoch], tf.int64), example['index'])
  return augment.multi_crop(_float01(example['image']), seed, config.aug, config.data.mean,
                            config.data.std)


def train_batches(source: Source, config, *, epoch: int, start_step: int = 0,
                  process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Steps [start_step, steps_per_epoch) of an epoch: {'global_crops': float32 [b, 2, G, G, C],
  'local_crops': float32 [b, L, l, l, C]}, b = batch_size / process_count."""
  data = config.data
  local_batch = _local_batch(config.batch_size, process_count)
  num_steps = steps_per_epoch(source.num_examples(data.train_split), config.batch_size,
                              process_count)
  if not 0 <= start_step <= num_steps:
    raise ValueError(f'start_step={start_step} is outside the {num_steps} steps of an epoch: '
                     f'resume from a step in [0, {num_steps}]')
  shard_size = _shard_size(source, data.train_split, process_index, process_count)
  if shard_size == 0 and num_steps > 0:
    raise ValueError(f'process {process_index} of {process_count} has no examples of '
                     f"'{data.train_split}' to train on: use fewer processes")
  examples = _examples(source, data.train_split, config, process_index, process_count)
  examples = examples.shuffle(max(1, min(shard_size, data.shuffle_buffer)),
                              seed=_shuffle_seed(config.seed, epoch),
                              reshuffle_each_iteration=False)
  # Contiguous shards can leave the last processes a few examples short of N // P: they wrap
  # around to the start of their own order rather than run fewer steps than the others.
  examples = examples.repeat().skip(start_step * local_batch).take(
      (num_steps - start_step) * local_batch)
  crops = examples.map(functools.partial(_crops, config=config, epoch=epoch),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  batches = crops.batch(local_batch, drop_remainder=True).prefetch(data.prefetch)
  return batches.as_numpy_iterator()


def _center(example, *, data_config) -> dict:
  image = augment.center_view(_float01(example['image']), data_config.image_size,
                              data_config.mean, data_config.std)
  return {'image': image, 'label': example['label'], 'mask': tf.constant(True)}


def _padding(size: int, num_channels: int) -> dict:
  return {'image': tf.zeros([size, size, num_channels]), 'label': tf.constant(0, tf.int32),
          'mask': tf.constant(False)}


def eval_batches(source: Source, split: str, config, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Un-augmented batches {'image': float32 [b, H, W, C], 'label': int32 [b], 'mask': bool [b]},
  b = batch_size / process_count, each example of the split once over all processes."""
  data = config.data
  local_batch = _local_batch(batch_size, process_count)
  num_batches = num_eval_batches(source.num_examples(split), batch_size, process_count)
  examples = _examples(source, split, config, process_index, process_count)
  views = examples.map(functools.partial(_center, data_config=data),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors(
      _padding(data.image_size, source.info.num_channels)).repeat()
  batches = views.concatenate(padding).take(num_batches * local_batch).batch(local_batch)
  return batches.prefetch(data.prefetch).as_numpy_iterator()
