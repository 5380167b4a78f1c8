"""DINO multi-crop augmentation in TensorFlow, a pure function of (image, seed).

Only stateless random ops are used, so the crops of an example depend on nothing but its seed:
not on the batch it lands in, the number of processes, or a resumed run. Images are float32 in
[0, 1], [H, W, C] with C = 1 or 3; saturation, hue and grayscale act only on colour images.

Per view, in DINO's order: random resized crop -> flip -> colour jitter (p) -> grayscale (p) ->
Gaussian blur (p) -> solarisation (p, global view 2 only) -> (x - mean) / std.

The views of one size are augmented together as a stack [n, S, S, C], each with its own random
draws: one op per step for all of them instead of one per view keeps tf.data's per-op overhead,
which dominates on small images, from multiplying by the number of crops.

`linear_train_view` is the linear evaluation's training view (random resized crop, flip) and
`center_view` the un-augmented view of evaluation.
"""
from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

_LOG_ASPECT_RATIO = (math.log(3 / 4), math.log(4 / 3))
_CROP_ATTEMPTS = 10  # then the whole image, as torchvision falls back after 10 tries
_SOLARIZE_THRESHOLD = 0.5  # torchvision's 128 of 255
LINEAR_SCALE = (0.08, 1.0)  # RandomResizedCrop's default scale, the linear evaluation's crops


def _seeds(seed, num: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def _uniform(seed, shape, low, high) -> tf.Tensor:
  return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high)


def _coins(seed, probabilities) -> tf.Tensor:
  """One bool per view, True with that view's probability, shaped [n, 1, 1, 1] to select views."""
  probabilities = tf.constant(probabilities, tf.float32)
  heads = tf.random.stateless_uniform(probabilities.shape, seed) < probabilities
  return heads[:, None, None, None]


def resize(image, size: int) -> tf.Tensor:
  # Bicubic as in DINO; it overshoots, so clip back to [0, 1].
  resized = tf.image.resize(image, [size, size], method='bicubic', antialias=True)
  return tf.clip_by_value(resized, 0.0, 1.0)


def sample_boxes(seed, num: int, scale: Sequence[float], height, width) -> tf.Tensor:
  """[num, 4] crop boxes (y1, x1, y2, x2) in [0, 1]: torchvision's RandomResizedCrop sampling.

  Area a fraction U(scale) of the image, aspect ratio log-uniform in [3/4, 4/3], the first of
  10 tries that fits, else the whole image; then a uniform position.
  """
  area_seed, ratio_seed, position_seed = _seeds(seed, 3)
  area = _uniform(area_seed, [num, _CROP_ATTEMPTS], *scale)
  ratio = tf.exp(_uniform(ratio_seed, [num, _CROP_ATTEMPTS], *_LOG_ASPECT_RATIO))
  image_ratio = tf.cast(height, tf.float32) / tf.cast(width, tf.float32)
  box_width = tf.sqrt(area * ratio * image_ratio)  # fractions of the image's width and height
  box_height = tf.sqrt(area / ratio / image_ratio)
  fits = (box_width <= 1.0) & (box_height <= 1.0)
  first_fit = tf.argmax(tf.cast(fits, tf.int32), axis=1)
  found = tf.reduce_any(fits, axis=1)
  box_width = tf.where(found, tf.gather(box_width, first_fit, batch_dims=1), 1.0)
  box_height = tf.where(found, tf.gather(box_height, first_fit, batch_dims=1), 1.0)
  top_left = _uniform(position_seed, [num, 2], 0.0, 1.0) * tf.stack(
      [1.0 - box_height, 1.0 - box_width], axis=1)
  return tf.concat([top_left, top_left + tf.stack([box_height, box_width], axis=1)], axis=1)


def _random_resized_crops(image, seed, num: int, size: int, scale) -> tf.Tensor:
  shape = tf.shape(image)
  boxes = sample_boxes(seed, num, scale, shape[0], shape[1])
  crops = tf.image.crop_and_resize(image[None], boxes, tf.zeros([num], tf.int32), [size, size])
  return tf.clip_by_value(crops, 0.0, 1.0)


def _gray(views) -> tf.Tensor:
  """Luma [..., 1]; a one-channel image is its own luma."""
  return tf.image.rgb_to_grayscale(views) if views.shape[-1] == 3 else views


def _blend(views, reference, factor) -> tf.Tensor:
  return tf.clip_by_value(reference + factor * (views - reference), 0.0, 1.0)


def _factors(seed, num: int, strength: float) -> tf.Tensor:
  return _uniform(seed, [num, 1, 1, 1], max(0.0, 1.0 - strength), 1.0 + strength)


def _shift_hue(views, shift) -> tf.Tensor:
  hsv = tf.image.rgb_to_hsv(views)
  hue = tf.math.floormod(hsv[..., :1] + shift, 1.0)
  return tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], -1)), 0.0, 1.0)


def color_jitter(views, seed, strengths: Sequence[float]) -> tf.Tensor:
  """torchvision's ColorJitter on [n, S, S, C], in a fixed order: brightness, contrast,
  saturation, hue; each factor U(1 - s, 1 + s) (hue: shift U(-s, s)), drawn per view."""
  brightness, contrast, saturation, hue = strengths
  num = views.shape[0]
  seeds = _seeds(seed, 4)
  colour = views.shape[-1] == 3
  if brightness > 0:
    views = _blend(views, 0.0, _factors(seeds[0], num, brightness))
  if contrast > 0:
    mean = tf.reduce_mean(_gray(views), axis=[1, 2, 3], keepdims=True)
    views = _blend(views, mean, _factors(seeds[1], num, contrast))
  if saturation > 0 and colour:
    views = _blend(views, _gray(views), _factors(seeds[2], num, saturation))
  if hue > 0 and colour:
    views = _shift_hue(views, _uniform(seeds[3], [num, 1, 1, 1], -hue, hue))
  return views


def grayscale(views) -> tf.Tensor:
  return tf.tile(_gray(views), [1] * (views.shape.rank - 1) + [views.shape[-1]])


def blur_radius(size: int, max_sigma: float) -> int:
  """Half-width of the blur kernel: 3 sigma, but at most a quarter of the view (at least 1)."""
  return max(1, min(math.ceil(3 * max_sigma), size // 4))


def gaussian_blur(views, sigmas, radius: int) -> tf.Tensor:
  """Separable Gaussian blur of [n, S, S, C] with one sigma per view and mirrored edges."""
  num, size, _, channels = views.shape
  offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernels = tf.exp(-0.5 * tf.square(offsets / tf.reshape(sigmas, [-1, 1])))
  kernels = kernels / tf.reduce_sum(kernels, axis=1, keepdims=True)
  # Views and channels side by side as the channels of one image: one depthwise conv for all.
  kernels = tf.repeat(tf.transpose(kernels), channels, axis=1)  # [2r + 1, n * C]
  stacked = tf.reshape(tf.transpose(views, [1, 2, 0, 3]), [1, size, size, num * channels])
  padded = tf.pad(stacked, [[0, 0], [radius, radius], [radius, radius], [0, 0]], 'SYMMETRIC')
  blurred = tf.nn.depthwise_conv2d(padded, kernels[:, None, :, None], [1, 1, 1, 1], 'VALID')
  blurred = tf.nn.depthwise_conv2d(blurred, kernels[None, :, :, None], [1, 1, 1, 1], 'VALID')
  return tf.transpose(tf.reshape(blurred, [size, size, num, channels]), [2, 0, 1, 3])


def solarize(views) -> tf.Tensor:
  return tf.where(views < _SOLARIZE_THRESHOLD, views, 1.0 - views)


def normalize(image, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  channels = image.shape[-1]
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f'data.mean={tuple(mean)} and data.std={tuple(std)} need one value per '
                     f'channel and the images have {channels}: set both to {channels} values')
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _augmented_views(image, seed, aug_config, *, size: int, scale, blur_probs: Sequence[float],
                     solarize_probs: Sequence[float]) -> tf.Tensor:
  """len(blur_probs) views [n, size, size, C] in [0, 1]; view i is blurred with blur_probs[i]
  and solarised with solarize_probs[i]."""
  num = len(blur_probs)
  seeds = _seeds(seed, 8)
  views = _random_resized_crops(image, seeds[0], num, size, scale)
  if aug_config.flip:
    views = tf.where(_coins(seeds[1], [0.5] * num), tf.reverse(views, axis=[2]), views)
  if aug_config.color_jitter_prob > 0:
    views = tf.where(_coins(seeds[2], [aug_config.color_jitter_prob] * num),
                     color_jitter(views, seeds[3], aug_config.color_jitter), views)
  if aug_config.grayscale_prob > 0 and image.shape[-1] == 3:
    views = tf.where(_coins(seeds[4], [aug_config.grayscale_prob] * num), grayscale(views), views)
  if max(blur_probs) > 0:
    sigmas = _uniform(seeds[6], [num], *aug_config.blur_sigma)
    blurred = gaussian_blur(views, sigmas, blur_radius(size, max(aug_config.blur_sigma)))
    views = tf.where(_coins(seeds[5], blur_probs), blurred, views)
  if max(solarize_probs) > 0:
    views = tf.where(_coins(seeds[7], solarize_probs), solarize(views), views)
  return views


def multi_crop(image_float01, seed, aug_config, mean: Sequence[float],
               std: Sequence[float]) -> dict[str, tf.Tensor]:
  """{'global_crops': [2, G, G, C], 'local_crops': [L, l, l, C]}, normalised, from one image."""
  global_seed, local_seed = _seeds(seed, 2)
  blur_global1, blur_global2, blur_local = aug_config.blur_prob
  global_crops = _augmented_views(
      image_float01, global_seed, aug_config, size=aug_config.global_size,
      scale=aug_config.global_scale, blur_probs=[blur_global1, blur_global2],
      solarize_probs=[0.0, aug_config.solarize_prob])
  num_local = aug_config.num_local
  if num_local:
    local_crops = _augmented_views(
        image_float01, local_seed, aug_config, size=aug_config.local_size,
        scale=aug_config.local_scale, blur_probs=[blur_local] * num_local,
        solarize_probs=[0.0] * num_local)
  else:
    local_crops = tf.zeros([0, aug_config.local_size, aug_config.local_size,
                            image_float01.shape[-1]])
  return {'global_crops': normalize(global_crops, mean, std),
          'local_crops': normalize(local_crops, mean, std)}


def linear_train_view(image_float01, seed, *, size: int, scale: Sequence[float] = LINEAR_SCALE,
                      flip: bool, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """The training view of the linear evaluation: [size, size, C], normalised.

  torchvision's RandomResizedCrop(size, scale) (default scale (0.08, 1.0)) then, when `flip`, a
  horizontal flip with probability 0.5, as in DINO's linear evaluation; the seed decides both.
  """
  crop_seed, flip_seed = _seeds(seed, 2)
  views = _random_resized_crops(image_float01, crop_seed, 1, size, scale)
  if flip:
    views = tf.where(_coins(flip_seed, [0.5]), tf.reverse(views, axis=[2]), views)
  return normalize(views[0], mean, std)


def center_view(image_float01, size: int, mean: Sequence[float],
                std: Sequence[float]) -> tf.Tensor:
  """The un-augmented view for evaluation and the prior sweep: resized to [size, size, C]."""
  return normalize(resize(image_float01, size), mean, std)
