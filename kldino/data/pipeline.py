"""Host batches: augmented multi-crop batches for training, padded and masked ones for evaluation.

Training order is a pure function of (seed, epoch, data shards): the training split is cut into
`data.shards` contiguous shards (default: one per process), each shuffled with a seed from
(seed, epoch) and contributing batch_size / shards examples to every global batch; each example
is augmented with a seed from (seed, epoch, index). A process reads only the shards it owns, so a
resumed run (`start_step`) sees exactly the batches an uninterrupted run would have, and with a
fixed `data.shards` so does a run on another number of processes (e.g. 1 process with shards=2
sees the global batches of 2 processes).
The linear evaluation's training batches (`linear_train_batches`) are made the same way, with
one crop-and-flip view and the label of each example in place of the multi-crop views.
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


def _local_batch(global_batch: int, parts: int) -> int:
  """The rows of one data shard (or process) in a global batch."""
  if global_batch < parts or global_batch % parts:
    raise ValueError(f'batch size {global_batch} must be a positive multiple of the {parts} '
                     'data shards (one per process unless data.shards is set): change it')
  return global_batch // parts


def num_shards(data_config, process_count: int) -> int:
  """Training data shards: `data.shards`, or one per process when it is 0."""
  shards = data_config.shards or process_count
  if shards % process_count:
    raise ValueError(f'data.shards={shards} must be a multiple of the {process_count} '
                     'processes (each reads whole shards): change data.shards')
  return shards


def steps_per_epoch(num_train_examples: int, global_batch: int, shards: int) -> int:
  """Steps that every process runs in an epoch; the remainder of the data is dropped."""
  return (num_train_examples // shards) // _local_batch(global_batch, shards)


def num_eval_batches(num_examples: int, batch_size: int, shards: int) -> int:
  """Batches that every process yields for a split: enough for the largest shard."""
  largest_shard = -(-num_examples // shards)
  return -(-largest_shard // _local_batch(batch_size, shards))


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


def _example_seed(config, epoch: int, index) -> tf.Tensor:
  """The augmentation seed of an example in an epoch: a pure function of (seed, epoch, index)."""
  return tf.random.experimental.stateless_fold_in(
      tf.constant([config.seed, epoch], tf.int64), index)


def _crops(example, *, config, epoch: int) -> dict:
  return augment.multi_crop(_float01(example['image']),
                            _example_seed(config, epoch, example['index']), config.aug,
                            config.data.mean, config.data.std)


def _linear_view(example, *, config, epoch: int, scale) -> dict:
  image = augment.linear_train_view(
      _float01(example['image']), _example_seed(config, epoch, example['index']),
      size=config.data.image_size, scale=scale, flip=config.aug.flip, mean=config.data.mean,
      std=config.data.std)
  return {'image': image, 'label': tf.cast(example['label'], tf.int32),
          'mask': tf.constant(True)}


def _shard_batches(source: Source, config, view, *, epoch: int, start_step: int, shard: int,
                   shards: int, num_steps: int, batch_size: int) -> tf.data.Dataset:
  """Steps [start_step, num_steps) of one shard's part of the global batches of `batch_size`:
  the shard's examples in the epoch's shuffled order, each mapped by view(example, epoch=...)."""
  data = config.data
  shard_batch = _local_batch(batch_size, shards)
  shard_size = _shard_size(source, data.train_split, shard, shards)
  if shard_size == 0 and num_steps > 0:
    raise ValueError(f'data shard {shard} of {shards} has no examples of '
                     f"'{data.train_split}' to train on: use fewer shards or processes")
  examples = _examples(source, data.train_split, config, shard, shards)
  examples = examples.shuffle(max(1, min(shard_size, data.shuffle_buffer)),
                              seed=_shuffle_seed(config.seed, epoch),
                              reshuffle_each_iteration=False)
  # Contiguous shards can leave the last ones a few examples short of N // S: they wrap around
  # to the start of their own order rather than run fewer steps than the others.
  examples = examples.repeat().skip(start_step * shard_batch).take(
      (num_steps - start_step) * shard_batch)
  views = examples.map(functools.partial(view, epoch=epoch),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return views.batch(shard_batch, drop_remainder=True)


def _concat_shards(*parts):
  return {key: tf.concat([part[key] for part in parts], axis=0) for key in parts[0]}


def _process_batches(make_shard_batches, shards: int, process_index: int,
                     process_count: int) -> tf.data.Dataset:
  """The batches of this process's shards, side by side in shard order."""
  per_process = shards // process_count
  parts = [make_shard_batches(shard)
           for shard in range(process_index * per_process, (process_index + 1) * per_process)]
  if len(parts) == 1:
    return parts[0]
  return tf.data.Dataset.zip(tuple(parts)).map(_concat_shards)


def _epoch_batches(source: Source, config, view, *, epoch: int, start_step: int,
                   batch_size: int, process_index: int,
                   process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """Steps [start_step, steps_per_epoch) of an epoch of the training split in global batches of
  `batch_size`, each example mapped by `view`; this process's rows of each batch."""
  data = config.data
  shards = num_shards(data, process_count)
  _local_batch(batch_size, shards)
  num_steps = steps_per_epoch(source.num_examples(data.train_split), batch_size, shards)
  if not 0 <= start_step <= num_steps:
    raise ValueError(f'start_step={start_step} is outside the {num_steps} steps of an epoch: '
                     f'resume from a step in [0, {num_steps}]')
  batches = _process_batches(
      lambda shard: _shard_batches(source, config, view, epoch=epoch, start_step=start_step,
                                   shard=shard, shards=shards, num_steps=num_steps,
                                   batch_size=batch_size),
      shards, process_index, process_count)
  return batches.prefetch(data.prefetch).as_numpy_iterator()


def train_batches(source: Source, config, *, epoch: int, start_step: int = 0,
                  process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Steps [start_step, steps_per_epoch) of an epoch: {'global_crops': float32 [b, 2, G, G, C],
  'local_crops': float32 [b, L, l, l, C]}, b = batch_size / process_count, the rows of this
  process's shards side by side (shard order)."""
  return _epoch_batches(source, config, functools.partial(_crops, config=config), epoch=epoch,
                        start_step=start_step, batch_size=config.batch_size,
                        process_index=process_index, process_count=process_count)


def linear_steps_per_epoch(source: Source, config, *, batch_size: int,
                           process_count: int = 1) -> int:
  """Steps of an epoch of linear_train_batches with global batch `batch_size`."""
  return steps_per_epoch(source.num_examples(config.data.train_split), batch_size,
                         num_shards(config.data, process_count))


def linear_train_batches(source: Source, config, *, epoch: int, start_step: int = 0,
                         batch_size: int, scale=augment.LINEAR_SCALE, process_index: int = 0,
                         process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Steps [start_step, linear_steps_per_epoch) of an epoch of the linear evaluation's training:
  {'image': float32 [b, S, S, C], 'label': int32 [b], 'mask': bool [b] (all True)},
  S = data.image_size, b = batch_size / process_count.

  Each data shard's examples come in the shuffled order of train_batches' epoch (a function of
  seed and epoch); each view is augment.linear_train_view (a random resized crop of `scale`,
  then a flip when aug.flip) with the seed of (seed, epoch, example index).
  """
  view = functools.partial(_linear_view, config=config, scale=tuple(scale))
  return _epoch_batches(source, config, view, epoch=epoch, start_step=start_step,
                        batch_size=batch_size, process_index=process_index,
                        process_count=process_count)


def _center(example, *, data_config) -> dict:
  image = augment.center_view(_float01(example['image']), data_config.image_size,
                              data_config.mean, data_config.std)
  return {'image': image, 'label': example['label'], 'mask': tf.constant(True)}


def _padding(size: int, num_channels: int) -> dict:
  return {'image': tf.zeros([size, size, num_channels]), 'label': tf.constant(0, tf.int32),
          'mask': tf.constant(False)}


def _shard_eval_batches(source: Source, split: str, config, *, shard: int, shards: int,
                        shard_batch: int, num_batches: int) -> tf.data.Dataset:
  data = config.data
  views = _examples(source, split, config, shard, shards).map(
      functools.partial(_center, data_config=data), num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True)
  padding = tf.data.Dataset.from_tensors(
      _padding(data.image_size, source.info.num_channels)).repeat()
  return views.concatenate(padding).take(num_batches * shard_batch).batch(shard_batch)


def eval_batches(source: Source, split: str, config, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Un-augmented batches {'image': float32 [b, H, W, C], 'label': int32 [b], 'mask': bool [b]},
  b = batch_size / process_count, each example of the split once over all processes.

  Batches are made of the data shards' parts like training batches, so that their composition
  (which matters to a head with batch statistics) does not depend on the number of processes.
  """
  shards = num_shards(config.data, process_count)
  shard_batch = _local_batch(batch_size, shards)
  num_batches = num_eval_batches(source.num_examples(split), batch_size, shards)
  batches = _process_batches(
      lambda shard: _shard_eval_batches(source, split, config, shard=shard, shards=shards,
                                        shard_batch=shard_batch, num_batches=num_batches),
      shards, process_index, process_count)
  return batches.prefetch(config.data.prefetch).as_numpy_iterator()


def preview_views(source: Source, split: str, config, num_images: int) -> Iterator[dict]:
  """The first `num_images` examples of a split, in evaluation order, as the model sees them:
  {'eval': [S, S, C], 'global_crops', 'local_crops' (epoch 0's augmentation), normalised;
  'label', 'file' (the source's name of the image)}."""
  examples = _examples(source, split, config, 0, 1).take(num_images)

  def views(example):
    return {'eval': _center(example, data_config=config.data)['image'],
            **_crops(example, config=config, epoch=0), 'label': example['label']}
  names = source.file_names(split, num_images)
  for name, example in zip(names, examples.map(views).as_numpy_iterator()):
    yield {**example, 'file': name}
