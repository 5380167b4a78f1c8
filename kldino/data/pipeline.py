"""Host batches: augmented multi-crop batches for training, padded and masked ones for evaluation.

Training batches are a pure function of (seed, epoch, data shards): the split is cut into
`data.shards` contiguous shards (default one per process), each shuffled per epoch and giving
batch_size / shards examples to every global batch, each example augmented with a seed from
(seed, epoch, index); a resumed run (`start_step`) sees the batches of an uninterrupted one, and
with a fixed data.shards so does a run on another number of processes. The linear evaluation's
batches (`linear_train_batches`) are made the same way with one crop-and-flip view, each example
once per epoch (the last batch filled with masked padding, as DINO keeps it). Evaluation
reads every example exactly once over all processes, every process yielding as many batches
(padding masked out). Examples stay encoded until a view is cut (kldino/data/augment.py); a small
shard is cached in memory. The evaluation view is DINO's Resize(data.eval_resize) +
CenterCrop(data.image_size). How batches are made and how fast: docs/input.md.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

from kldino.data import augment
from kldino.data import gram_crops
from kldino.data import masking
from kldino.data import unreadable
from kldino.data.datasets import Source, shard_range

_CROP_KEYS = ('global_crops', 'local_crops')
_CACHE_BYTES = 2 * 2**30  # per process: the stored shard of a small dataset, kept across epochs


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


def host_batch_bytes(config, process_count: int) -> int:
  """Bytes of the training batches a host holds at once: data.prefetch batches ahead, the one
  being made, and the two the loop sends ahead to the devices (core/sharding.py), float32."""
  aug = config.aug
  global_pixels = aug.global_size**2 + gram_crops.size(config)**2  # the Gram teacher's crops too
  pixels = 2 * global_pixels + aug.num_local * aug.local_size**2
  example_bytes = pixels * len(config.data.mean) * 4
  return (config.batch_size // process_count) * example_bytes * (config.data.prefetch + 3)


def steps_per_epoch(num_train_examples: int, global_batch: int, shards: int) -> int:
  """Steps that every process runs in an epoch; the remainder of the data is dropped."""
  return (num_train_examples // shards) // _local_batch(global_batch, shards)


def num_eval_batches(num_examples: int, batch_size: int, shards: int) -> int:
  """Batches that every process yields for a split: enough for the largest shard."""
  largest_shard = -(-num_examples // shards)
  return -(-largest_shard // _local_batch(batch_size, shards))


@functools.lru_cache(maxsize=16)
def _shard(source: Source, split: str, process_index: int, process_count: int,
           in_memory: bool) -> tf.data.Dataset:
  """One process's examples of a split as stored (encoded when the source can); the same object
  each time, so that its cache lasts."""
  examples = source.read(split,
                         process_index=process_index,
                         process_count=process_count,
                         decode=False)
  return examples.cache() if in_memory else examples


def _shard_size(source: Source, split: str, process_index: int, process_count: int) -> int:
  start, stop = shard_range(source.num_examples(split), process_index, process_count)
  return stop - start


def _shard_bytes(source: Source, split: str, config, process_index: int,
                 process_count: int) -> float:
  """About the bytes of one process's examples of a split, as stored."""
  shard_size = _shard_size(source, split, process_index, process_count)
  stored = source.info.num_bytes.get(split, 0)
  if stored:
    return stored * shard_size / source.num_examples(split)
  # decoded arrays of unknown size: about image_size^2 pixels each
  return shard_size * config.data.image_size**2 * source.info.num_channels


def _examples(source: Source, split: str, config, process_index: int,
              process_count: int) -> tf.data.Dataset:
  in_memory = _shard_bytes(source, split, config, process_index, process_count) <= _CACHE_BYTES
  return _shard(source, split, process_index, process_count, in_memory)


def _small_shape(source: Source) -> tuple[int, int] | None:
  """The images' (height, width) when they all have it and are small (the digits), else None:
  augment.augment_views then crops them too, in its XLA program."""
  shape = source.info.image_shape
  return shape if shape and shape[0] * shape[1] <= augment.SMALL_IMAGE_PIXELS else None


def _shuffle_seed(seed: int, epoch: int) -> int:
  # tf.data takes one integer: mix (seed, epoch) so that neighbouring epochs are unrelated.
  return int(np.random.SeedSequence([seed % 2**32, epoch]).generate_state(1)[0])


def epoch_permutation(seed: int, epoch: int, shard: int, size: int) -> np.ndarray:
  """The order of a data shard's `size` examples in an epoch with data.shuffle='permutation'
  on a source read by position: a uniform permutation of range(size), a function of (seed,
  epoch, shard) alone."""
  return np.random.default_rng([seed % 2**32, epoch, shard]).permutation(size)


def _epoch_examples(source: Source, config, *, epoch: int, shard: int,
                    shards: int) -> tf.data.Dataset:
  """A data shard's training examples in the epoch's order (data.shuffle): 'permutation', a
  full permutation of the shard (epoch_permutation on a source read by position; else a shuffle
  buffer of the whole shard, held in memory: a uniform permutation too); 'buffer', a shuffle
  buffer of data.shuffle_buffer examples. Either is a function of (seed, epoch) and the shard."""
  data, split = config.data, config.data.train_split
  shard_size = _shard_size(source, split, shard, shards)
  if data.shuffle == 'permutation' and source.read_positions is not None and shard_size:
    start, _ = shard_range(source.num_examples(split), shard, shards)
    order = start + epoch_permutation(config.seed, epoch, shard, shard_size)
    return source.read_at(split, order, decode=False)
  buffer = shard_size if data.shuffle == 'permutation' else min(shard_size, data.shuffle_buffer)
  return _examples(source, split, config, shard,
                   shards).shuffle(max(1, buffer),
                                   seed=_shuffle_seed(config.seed, epoch),
                                   reshuffle_each_iteration=False)


def check_shuffle(source: Source, config, process_count: int):
  """Refuses, before anything is read, data.shuffle='permutation' of a source read in order
  (not by position) whose data shard exceeds the in-memory cache: it would buffer the whole
  shard."""
  data = config.data
  if data.shuffle != 'permutation' or source.read_positions is not None:
    return
  shard_bytes = _shard_bytes(source, data.train_split, config, 0, num_shards(data, process_count))
  if shard_bytes > _CACHE_BYTES:
    raise ValueError(
        f"data.shuffle='permutation' buffers a whole data shard of a source read in order, and "
        f"a shard of '{source.name}' split '{data.train_split}' takes about "
        f'{shard_bytes / 2**30:.1f} GiB (at most {_CACHE_BYTES / 2**30:.0f}): set '
        "data.shuffle='buffer' (data.shuffle_buffer examples), or read the images as a folder "
        "(data.name='folder'), which is permuted by position")


def _example_seed(config, epoch: int, index) -> tf.Tensor:
  """The augmentation seed of an example in an epoch: a pure function of (seed, epoch, index)."""
  return tf.random.experimental.stateless_fold_in(tf.constant([config.seed, epoch], tf.int64),
                                                  index,
                                                  alg='philox')


def _batch_augmented(config) -> bool:
  """Whether the crops are augmented on whole batches by XLA (augment.augment_views), which pays
  its compilation back on large crops only; else example by example in tf.data."""
  return config.aug.global_size >= config.aug.xla_min_size


def _crops(example, *, config, epoch: int, num_channels: int, small_shape) -> dict:
  """An example's multi-crop views (and DINOv3's Gram teacher crops, gram_crops.size):
  augment.multi_crop_views, then augment.augment_example unless _batch_augmented (then with the
  seed that augment_views takes). Small images of one size (`small_shape`, the digits) are
  upscaled to data.image_size and cropped by matmuls."""
  seed = _example_seed(config, epoch, example['index'])
  image = example['image']
  if small_shape:
    if image.dtype == tf.string:
      image = augment.decode(image, num_channels)
    image = tf.ensure_shape(image, [*small_shape, num_channels])
  crops = augment.multi_crop_views(image,
                                   seed,
                                   config.aug,
                                   min_size=config.data.image_size,
                                   num_channels=num_channels,
                                   small_image=bool(small_shape),
                                   gram_size=gram_crops.size(config))
  if _batch_augmented(config):
    return {**crops, 'seed': seed}
  return augment.augment_example(crops, seed, config.aug, config.data.mean, config.data.std)


def _linear_view(example, *, config, epoch: int, scale, num_channels: int, small_shape) -> dict:
  image = example['image']
  if small_shape and image.dtype == tf.string:
    image = tf.ensure_shape(augment.decode(image, num_channels), [*small_shape, num_channels])
  image = augment.linear_train_view(image,
                                    _example_seed(config, epoch, example['index']),
                                    size=config.data.image_size,
                                    scale=scale,
                                    flip=config.aug.flip,
                                    mean=config.data.mean,
                                    std=config.data.std,
                                    min_size=config.data.image_size,
                                    num_channels=num_channels,
                                    small_image=bool(small_shape))
  return {'image': image, 'label': tf.cast(example['label'], tf.int32), 'mask': tf.constant(True)}


def _traced(fn):
  """fn for tf.data's map, traced as it is: its Python branches are on static values, and
  AutoGraph's conversion of the augmentation's many small functions costs seconds per pipeline."""
  return tf.autograph.experimental.do_not_convert(fn)


def _shard_batches(source: Source, config, view, *, epoch: int, start_step: int, shard: int,
                   shards: int, num_steps: int, batch_size: int) -> tf.data.Dataset:
  """Steps [start_step, num_steps) of one shard's part of the global batches of `batch_size`:
  the shard's examples in the epoch's shuffled order, each mapped by view(example, epoch=...);
  images that cannot be decoded are skipped (unreadable.tolerant_map), and the examples after
  them move up. At most _max_unreadable of them per epoch: past that the batches run short."""
  data = config.data
  shard_batch = _local_batch(batch_size, shards)
  shard_size = _shard_size(source, data.train_split, shard, shards)
  if shard_size == 0 and num_steps > 0:
    raise ValueError(f'data shard {shard} of {shards} has no examples of '
                     f"'{data.train_split}' to train on: use fewer shards or processes")
  examples = _epoch_examples(source, config, epoch=epoch, shard=shard, shards=shards)
  # Contiguous shards can leave the last ones a few examples short of N // S: they wrap around
  # to the start of their own order rather than run fewer steps than the others.
  num_examples = (num_steps - start_step) * shard_batch
  examples = examples.repeat().skip(
      start_step * shard_batch).take(num_examples + _max_unreadable(data, shard_size))
  views = unreadable.tolerant_map(examples,
                                  _traced(functools.partial(view, epoch=epoch)),
                                  tally=source.unreadable,
                                  split=data.train_split)
  return views.take(num_examples).batch(shard_batch, drop_remainder=True)


def _whole_shard_batches(source: Source, config, view, *, epoch: int, start_step: int, shard: int,
                         shards: int, num_steps: int, batch_size: int) -> tf.data.Dataset:
  """Steps [start_step, num_steps) of one shard's part of an epoch that keeps its last partial
  batch: each of the shard's examples once, in the epoch's order, mapped by view(example,
  epoch=...), then padding rows (mask False) up to num_steps; images that cannot be decoded
  are skipped, the padding moving up."""
  data = config.data
  shard_batch = _local_batch(batch_size, shards)
  examples = _epoch_examples(source, config, epoch=epoch, shard=shard, shards=shards)
  views = unreadable.tolerant_map(examples.skip(start_step * shard_batch),
                                  _traced(functools.partial(view, epoch=epoch)),
                                  tally=source.unreadable,
                                  split=data.train_split,
                                  end_marker=_end_marker(source, examples))
  return _padded_batches(views,
                         source,
                         config,
                         num_batches=num_steps - start_step,
                         shard_batch=shard_batch)


def _padded_batches(views: tf.data.Dataset, source: Source, config, *, num_batches: int,
                    shard_batch: int) -> tf.data.Dataset:
  """`num_batches` batches of `shard_batch` rows: the views, then padding rows (mask False)."""
  padding = tf.data.Dataset.from_tensors(_padding(config.data.image_size,
                                                  source.info.num_channels)).repeat()
  return views.concatenate(padding).take(num_batches * shard_batch).batch(shard_batch)


def _max_unreadable(data_config, num_examples: int) -> int:
  return int(data_config.max_corrupt_fraction * num_examples)


def _checked(batches: Iterator, source: Source, split: str, config, num_batches: int) -> Iterator:
  """`batches`, stopping with unreadable.TooManyUnreadable as soon as more of the split's images
  than data.max_corrupt_fraction could not be decoded, or when fewer than `num_batches` came
  (every image of the rest failed)."""
  fraction = config.data.max_corrupt_fraction
  num_examples = source.num_examples(split)

  names = functools.partial(source.names, split)

  def check():
    source.unreadable.warn(split, names)
    source.unreadable.check(split, num_examples, fraction, names)

  count = 0
  for batch in batches:
    check()
    count += 1
    yield batch
  check()
  if count < num_batches:
    raise unreadable.TooManyUnreadable(
        f"split '{split}' ran out of images that can be decoded after {count} of {num_batches} "
        f'batches ({source.unreadable.count(split)} skipped so far): replace or remove the '
        'unreadable images')


def _checked_epoch(batches: Iterator,
                   source: Source,
                   config,
                   *,
                   batch_size: int,
                   start_step: int,
                   process_count: int,
                   keep_last: bool = False) -> Iterator:
  """_checked for steps [start_step, steps of the epoch) of a training epoch."""
  num_steps = _epoch_steps(source, config, batch_size, process_count, keep_last=keep_last)
  return _checked(batches, source, config.data.train_split, config, num_steps - start_step)


def _with_threading(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """tf.data's ops run on its own threads, one op at a time (max_intra_op_parallelism 1): not on
  TF's shared intra-op pool, where they would queue behind the XLA programs of _augmented."""
  options = tf.data.Options()
  options.threading.max_intra_op_parallelism = 1
  return dataset.with_options(options)


def _concat_shards(*parts):
  return {key: tf.concat([part[key] for part in parts], axis=0) for key in parts[0]}


def _process_batches(make_shard_batches, shards: int, process_index: int,
                     process_count: int) -> tf.data.Dataset:
  """The batches of this process's shards, side by side in shard order."""
  per_process = shards // process_count
  parts = [
      make_shard_batches(shard)
      for shard in range(process_index * per_process, (process_index + 1) * per_process)
  ]
  if len(parts) == 1:
    return parts[0]
  return tf.data.Dataset.zip(tuple(parts)).map(_concat_shards)


def _epoch_steps(source: Source,
                 config,
                 batch_size: int,
                 process_count: int,
                 *,
                 keep_last: bool = False) -> int:
  """Steps of an epoch: the full batches (steps_per_epoch), or with keep_last every example's
  (the last batch partial, as num_eval_batches counts them)."""
  shards = num_shards(config.data, process_count)
  _local_batch(batch_size, shards)
  num_examples = source.num_examples(config.data.train_split)
  if keep_last:
    return num_eval_batches(num_examples, batch_size, shards)
  return steps_per_epoch(num_examples, batch_size, shards)


def _epoch_batches(source: Source,
                   config,
                   view,
                   *,
                   epoch: int,
                   start_step: int,
                   batch_size: int,
                   process_index: int,
                   process_count: int,
                   keep_last: bool = False) -> tf.data.Dataset:
  """Steps [start_step, steps of the epoch) of the training split in global batches of
  `batch_size`, each example mapped by `view`; this process's rows of each batch. With
  keep_last every example once (_whole_shard_batches), else full batches (_shard_batches)."""
  data = config.data
  shards = num_shards(data, process_count)
  num_steps = _epoch_steps(source, config, batch_size, process_count, keep_last=keep_last)
  if not 0 <= start_step <= num_steps:
    raise ValueError(f'start_step={start_step} is outside the {num_steps} steps of an epoch: '
                     f'resume from a step in [0, {num_steps}]')
  shard_batches = _whole_shard_batches if keep_last else _shard_batches
  batches = _process_batches(
      lambda shard: shard_batches(source,
                                  config,
                                  view,
                                  epoch=epoch,
                                  start_step=start_step,
                                  shard=shard,
                                  shards=shards,
                                  num_steps=num_steps,
                                  batch_size=batch_size), shards, process_index, process_count)
  return _with_threading(batches.prefetch(data.prefetch))


def _chunks(batch: dict, parts: int) -> list[tuple[int, dict]]:
  """(first row, rows) of `parts` chunks of a batch."""
  rows = batch['seed'].shape[0]
  size = -(-rows // parts)
  return [(start, {
      key: value[start:start + size] for key, value in batch.items()
  }) for start in range(0, rows, size)]


def _augmented(batches: tf.data.Dataset, config) -> Iterator[dict[str, np.ndarray]]:
  """The multi-crop batches of `batches` augmented (augment.augment_views, compiled by XLA) in a
  pool of threads, a chunk of each batch per core, data.prefetch batches ahead of the consumer
  as tf.data's prefetch was: the XLA programs run outside tf.data (augment's docstring), and TF
  lets go of the GIL while they run. Each example's views depend on its seed only, not on the
  chunk it lands in."""
  workers = os.cpu_count() or 1
  aug = config.aug
  gram_size = gram_crops.size(config)
  channels = len(config.data.mean)

  def augment_chunk(out, start, chunk):  # each thread copies its rows into the batch
    views = augment.augment_views(chunk, chunk['seed'], aug, config.data.mean, config.data.std)
    for key, value in views.items():
      out[key][start:start + value.shape[0]] = value.numpy()

  def submit(pool, batch):
    rows = batch['seed'].shape[0]
    out = {
        'global_crops':
            np.empty((rows, 2, aug.global_size, aug.global_size, channels), np.float32),
        'local_crops':
            np.empty((rows, aug.num_local, aug.local_size, aug.local_size, channels), np.float32)
    }
    if gram_size:
      out['gram_crops'] = np.empty((rows, 2, gram_size, gram_size, channels), np.float32)
    return out, [
        pool.submit(augment_chunk, out, start, chunk) for start, chunk in _chunks(batch, workers)
    ]

  def result(out, futures):
    for future in futures:
      future.result()
    return out

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for batch in batches:
      pending.append(submit(pool, batch))
      if len(pending) > config.data.prefetch:
        yield result(*pending.popleft())
    while pending:
      yield result(*pending.popleft())


def train_batches(source: Source,
                  config,
                  *,
                  epoch: int,
                  start_step: int = 0,
                  process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Steps [start_step, steps_per_epoch) of an epoch: {'global_crops': float32 [b, 2, G, G, C],
  'local_crops': float32 [b, L, l, l, C]}, b = batch_size / process_count, the rows of this
  process's shards side by side (shard order); with iBOT, 'masks': bool [b, 2, patches]; with
  DINOv3's Gram teacher crops, 'gram_crops': float32 [b, 2, S, S, C].

  Each example's crops are cut in tf.data (augment.multi_crop_views: decode, crop windows of the
  full-resolution image, resize) and augmented on whole batches (augment.augment_views), both
  with the seed of (seed, epoch, example index).
  """
  augment.normalize(tf.zeros([source.info.num_channels]), config.data.mean, config.data.std)
  view = functools.partial(_crops,
                           config=config,
                           num_channels=source.info.num_channels,
                           small_shape=_small_shape(source))
  batches = _epoch_batches(source,
                           config,
                           view,
                           epoch=epoch,
                           start_step=start_step,
                           batch_size=config.batch_size,
                           process_index=process_index,
                           process_count=process_count)
  batches = (_augmented(batches, config)
             if _batch_augmented(config) else batches.as_numpy_iterator())
  batches = _checked_epoch(batches,
                           source,
                           config,
                           batch_size=config.batch_size,
                           start_step=start_step,
                           process_count=process_count)
  if not masking.used(config.objective):
    return batches
  return _with_masks(batches,
                     config,
                     epoch=epoch,
                     start_step=start_step,
                     process_index=process_index,
                     process_count=process_count)


def _with_masks(batches: Iterator[dict], config, *, epoch: int, start_step: int, process_index: int,
                process_count: int) -> Iterator[dict]:
  """The batches with iBOT's masks [b, 2, patches] (masking.training_masks) of this process's
  rows of the global batch: the same masks on any number of processes."""
  rows = _local_batch(config.batch_size, process_count)
  group = masking.group_size(config, jax.device_count())
  for step, batch in enumerate(batches, start=start_step):
    yield {
        **batch, 'masks':
            masking.training_masks(config,
                                   epoch=epoch,
                                   step=step,
                                   first_row=process_index * rows,
                                   rows=rows,
                                   group=group)
    }


def linear_steps_per_epoch(source: Source,
                           config,
                           *,
                           batch_size: int,
                           process_count: int = 1) -> int:
  """Steps of an epoch of linear_train_batches with global batch `batch_size`: every example's,
  the last batch partial (DINO's linear training keeps it: drop_last=False)."""
  return _epoch_steps(source, config, batch_size, process_count, keep_last=True)


def linear_train_batches(source: Source,
                         config,
                         *,
                         epoch: int,
                         start_step: int = 0,
                         batch_size: int,
                         scale=augment.LINEAR_SCALE,
                         process_index: int = 0,
                         process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Steps [start_step, linear_steps_per_epoch) of an epoch of the linear evaluation's training:
  {'image': float32 [b, S, S, C], 'label': int32 [b], 'mask': bool [b]}, S = data.image_size,
  b = batch_size / process_count.

  Each data shard's examples come once, in the shuffled order of train_batches' epoch (a
  function of seed and epoch), the shard's last batch filled with padding rows (mask False, all
  zero); each view is augment.linear_train_view (a random resized crop of `scale` cut from the
  image at its own resolution, a JPEG decoding only the crop's window, then a flip when aug.flip)
  with the seed of (seed, epoch, example index).
  """
  view = functools.partial(_linear_view,
                           config=config,
                           scale=tuple(scale),
                           num_channels=source.info.num_channels,
                           small_shape=_small_shape(source))
  batches = _epoch_batches(source,
                           config,
                           view,
                           epoch=epoch,
                           start_step=start_step,
                           batch_size=batch_size,
                           process_index=process_index,
                           process_count=process_count,
                           keep_last=True)
  return _checked_epoch(batches.as_numpy_iterator(),
                        source,
                        config,
                        batch_size=batch_size,
                        start_step=start_step,
                        process_count=process_count,
                        keep_last=True)


def _center(example, *, data_config, num_channels: int, image_shape=None) -> dict:
  image = augment.center_view(example['image'],
                              data_config.image_size,
                              data_config.mean,
                              data_config.std,
                              resize=data_config.eval_resize,
                              num_channels=num_channels,
                              image_shape=image_shape)
  return {'image': image, 'label': example['label'], 'mask': tf.constant(True)}


def _padding(size: int, num_channels: int) -> dict:
  return {
      'image': tf.zeros([size, size, num_channels]),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(False)
  }


def _end_marker(source: Source, examples: tf.data.Dataset) -> dict:
  """An example that decodes, index -1: what unreadable.tolerant_map maps after the last."""
  pixels = tf.zeros([*(source.info.image_shape or (1, 1)), source.info.num_channels], tf.uint8)
  encoded = examples.element_spec['image'].dtype == tf.string
  return {
      'image': tf.io.encode_png(pixels) if encoded else pixels,
      'label': tf.constant(0, tf.int32),
      'index': tf.constant(-1, tf.int64)
  }


def _shard_eval_batches(source: Source, split: str, config, *, shard: int, shards: int,
                        shard_batch: int, num_batches: int) -> tf.data.Dataset:
  data = config.data
  examples = _examples(source, split, config, shard, shards)
  views = unreadable.tolerant_map(examples,
                                  _traced(
                                      functools.partial(_center,
                                                        data_config=data,
                                                        num_channels=source.info.num_channels,
                                                        image_shape=source.info.image_shape)),
                                  tally=source.unreadable,
                                  split=split,
                                  end_marker=_end_marker(source, examples))
  return _padded_batches(views, source, config, num_batches=num_batches, shard_batch=shard_batch)


def eval_batches(source: Source,
                 split: str,
                 config,
                 *,
                 batch_size: int,
                 process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Un-augmented batches {'image': float32 [b, S, S, C], 'label': int32 [b], 'mask': bool [b]},
  b = batch_size / process_count, each example of the split once over all processes; each image
  is augment.center_view: the shorter side resized to data.eval_resize (0: round(S * 256 / 224)),
  then the centre S x S, S = data.image_size.

  Batches are made of the data shards' parts like training batches, so that their composition
  (which matters to a head with batch statistics) does not depend on the number of processes.
  """
  augment.eval_resize(config.data.image_size, config.data.eval_resize)  # checked before reading
  shards = num_shards(config.data, process_count)
  shard_batch = _local_batch(batch_size, shards)
  num_batches = num_eval_batches(source.num_examples(split), batch_size, shards)
  batches = _process_batches(
      lambda shard: _shard_eval_batches(source,
                                        split,
                                        config,
                                        shard=shard,
                                        shards=shards,
                                        shard_batch=shard_batch,
                                        num_batches=num_batches), shards, process_index,
      process_count)
  return _checked(
      batches.prefetch(config.data.prefetch).as_numpy_iterator(), source, split, config,
      num_batches)


def preview_views(source: Source,
                  split: str,
                  config,
                  num_images: int,
                  *,
                  crops: bool = True) -> Iterator[dict]:
  """The first `num_images` examples of a split, in evaluation order, as the model sees them:
  {'eval': [S, S, C], 'global_crops', 'local_crops' (epoch 0's augmentation; without `crops`
  none), normalised; 'label', 'file' (the source's name of the image)}; images that cannot be
  decoded are left out (and named in a warning)."""
  examples = _examples(source, split, config, 0, 1).take(num_images)
  channels, small_shape = source.info.num_channels, _small_shape(source)
  crop_keys = _CROP_KEYS if crops else ()

  def views(example):
    eval_view = _center(example,
                        data_config=config.data,
                        num_channels=channels,
                        image_shape=source.info.image_shape)['image']
    training = (_crops(
        example, config=config, epoch=0, num_channels=channels, small_shape=small_shape)
                if crops else {})
    return {'eval': eval_view, **training, 'label': example['label'], 'index': example['index']}

  names = source.file_names(split, num_images)
  views = unreadable.tolerant_map(examples,
                                  _traced(views),
                                  tally=source.unreadable,
                                  split=split,
                                  end_marker=_end_marker(source, examples))
  for example in views.as_numpy_iterator():
    if crops and _batch_augmented(config):
      augmented = augment.augment_views({key: example[key][None] for key in _CROP_KEYS},
                                        example['seed'][None], config.aug, config.data.mean,
                                        config.data.std)
      example.update({key: value.numpy()[0] for key, value in augmented.items()})
    yield {
        **{
            key: example[key] for key in ('eval', 'label', *crop_keys)
        }, 'file': names[example['index']]
    }
