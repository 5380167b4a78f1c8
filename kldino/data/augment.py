"""DINO's multi-crop augmentation in TensorFlow, a pure function of (image, seed).

Only stateless random ops: an example's views depend on its seed alone, not on its batch, the
number of processes or a resumed run. Views are float32 [H, W, C] in [0, 1], C = 1 or 3.
Two stages: `multi_crop_views` decodes the image (a JPEG that gives one view decodes only its
window) and cuts torchvision's RandomResizedCrop windows at the image's own resolution, resized
bicubic with antialiasing (small images of known size, the 8x8 digits, are upscaled to
`min_size` first and cropped by sub-pixel windows); the augmentation then runs per view in DINO's
order (flip, colour jitter, grayscale, blur, solarisation, normalisation), op by op in tf.data
(`augment_example`) or on whole batches compiled by XLA (`augment_views`, for crops of at least
aug.xla_min_size, kldino/data/pipeline.py). `linear_train_view` is the linear evaluation's
training view and `center_view` the evaluation view. Why it is cut this way, with the
measurements: docs/input.md ("How the views are cut").
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import tensorflow as tf

_MIN_RATIO, _MAX_RATIO = 3 / 4, 4 / 3  # RandomResizedCrop's aspect ratios (width / height)
# Philox by name: 'auto_select' may pick another generator under XLA than on the CPU kernels,
# and the views of a seed must not depend on where they are augmented.
_RNG = 'philox'
_CROP_ATTEMPTS = 10  # then a centre crop, as torchvision falls back after 10 tries
_SOLARIZE_THRESHOLD = 0.5  # torchvision's 128 of 255
# ColorJitter's ops by torchvision's index (fn_idx), and the 24 orders its randperm(4) draws.
JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')
JITTER_ORDERS = tuple(itertools.permutations(range(len(JITTER_OPS))))
LINEAR_SCALE = (0.08, 1.0)  # RandomResizedCrop's default scale, the linear evaluation's crops
# DINO evaluates on Resize(256) then CenterCrop(224); data.eval_resize = 0 keeps that ratio.
EVAL_RESIZE_RATIO = 256 / 224
# A JPEG giving at most this many views decodes only their windows; more, it is decoded whole
# (measured in the module docstring: 10 partial decodes cost 3.3 full ones, 1 costs 0.7).
_PARTIAL_DECODE_MAX_VIEWS = 1
_JPEG_MAGIC = b'\xff\xd8\xff'
_DCT_METHOD = 'INTEGER_ACCURATE'  # libjpeg's JDCT_ISLOW, PIL's
# Images of at most this many pixels and of a size known in advance (the digits) are cropped by
# matmuls (_small_image_crops), in the XLA program of augment_views: in tf.data, the few hundred
# small ops of their per-window resizes cost more than the rest of the pipeline.
SMALL_IMAGE_PIXELS = 64 * 64


def _seeds(seed, num: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(seed, num, alg=_RNG))


def _uniform(seed, shape, low, high) -> tf.Tensor:
  return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high, alg=_RNG)


def _coins(seed, probabilities) -> tf.Tensor:
  """One bool per view, True with that view's probability, shaped [n, 1, 1, 1] to select views."""
  probabilities = tf.constant(probabilities, tf.float32)
  heads = tf.random.stateless_uniform(probabilities.shape, seed, alg=_RNG) < probabilities
  return heads[:, None, None, None]


# --------------------------------------------------------------------------- decoding, resizing


def is_jpeg(encoded) -> tf.Tensor:
  """Whether encoded image bytes are a JPEG (its SOI marker), as a bool tensor."""
  return tf.equal(tf.strings.substr(encoded, 0, 3), _JPEG_MAGIC)


def decode(encoded, num_channels: int) -> tf.Tensor:
  """Encoded image bytes (JPEG, PNG or GIF) -> uint8 [H, W, num_channels], the whole image.

  JPEGs with the accurate integer IDCT, as PIL (DINO's loader) decodes them: TF's default, the
  fast IDCT, differs from PIL by up to 4 levels on photographs and wraps around (255 levels) on
  hard edges; the accurate one gives PIL's pixels exactly (measured, tests/data/test_augment.py).
  decode_jpeg decodes PNG and GIF too, as decode_image does."""
  image = tf.io.decode_jpeg(encoded, channels=num_channels, dct_method=_DCT_METHOD)
  return tf.ensure_shape(image, [None, None, num_channels])


def _decoded(image, num_channels: int | None) -> tf.Tensor:
  """The image decoded whole when it is encoded, else as it is."""
  if image.dtype == tf.string:
    if num_channels is None:
      raise ValueError('an encoded image needs num_channels: pass the channels to decode to')
    image = decode(image, num_channels)
  return image


def resized_shape(height, width, size) -> tuple[tf.Tensor, tf.Tensor]:
  """torchvision's Resize(size) of an image [height, width]: the shorter side becomes `size` and
  the longer int(size * long / short)."""
  height, width = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
  size = tf.cast(size, tf.int64)
  long = size * tf.maximum(height, width) // tf.minimum(height, width)
  new_height = tf.where(height <= width, size, long)
  new_width = tf.where(height <= width, long, size)
  return tf.cast(new_height, tf.int32), tf.cast(new_width, tf.int32)


def _resize(image, height, width, method: str = 'bicubic') -> tf.Tensor:
  """float32 [..., height, width, C] in the input's range (uint8 gives 0..255), antialiased when
  it shrinks, as PIL's resize; bicubic overshoots, callers clip."""
  return tf.image.resize(image, tf.stack([height, width]), method=method, antialias=True)


def _unit(resized, dtype) -> tf.Tensor:
  """A resize of an image of `dtype` as float32 in [0, 1]."""
  if dtype == tf.uint8:
    resized = resized * (1 / 255)
  return tf.clip_by_value(resized, 0.0, 1.0)


def _as_dtype(resized, dtype) -> tf.Tensor:
  """A resize back in the image's dtype (uint8 rounded), so that it stands in for the image."""
  if dtype == tf.uint8:
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)
  return tf.clip_by_value(resized, 0.0, 1.0)


# --------------------------------------------------------------------------- crops


def crop_windows(seed,
                 num: int,
                 scale: Sequence[float],
                 height,
                 width,
                 *,
                 whole_pixels: bool = True) -> tf.Tensor:
  """[num, 4] windows (top, left, height, width) in pixels of an image [height, width]:
  torchvision's RandomResizedCrop.get_params, int32.

  Each of 10 tries draws an area fraction U(scale) and an aspect ratio (width / height)
  log-uniform in [3/4, 4/3] and rounds the window's sides to pixels (half to even, as Python's
  round); the first that fits inside the image is placed uniformly (integer offsets). When none
  fits, the window is a centre crop: the whole image if its aspect ratio is in [3/4, 4/3], else
  the largest window of the nearest ratio in that range. With whole_pixels=False the same draws
  without rounding: float32 windows anywhere between pixels (small images, _small_image_crops).
  """
  area_seed, ratio_seed, top_seed, left_seed = _seeds(seed, 4)
  snap = tf.round if whole_pixels else tf.identity
  height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = _uniform(area_seed, [num, _CROP_ATTEMPTS], *scale) * height_f * width_f
  ratio = tf.exp(
      _uniform(ratio_seed, [num, _CROP_ATTEMPTS], math.log(_MIN_RATIO), math.log(_MAX_RATIO)))
  tried_width = snap(tf.sqrt(area * ratio))
  tried_height = snap(tf.sqrt(area / ratio))
  fits = ((tried_width > 0) & (tried_width <= width_f) & (tried_height > 0) &
          (tried_height <= height_f))
  first_fit = tf.argmax(tf.cast(fits, tf.int32), axis=1)
  found = tf.reduce_any(fits, axis=1)
  image_ratio = width_f / height_f
  fallback_width = tf.where(image_ratio > _MAX_RATIO, snap(height_f * _MAX_RATIO), width_f)
  fallback_height = tf.where(image_ratio < _MIN_RATIO, snap(width_f / _MIN_RATIO), height_f)
  crop_width = tf.where(found, tf.gather(tried_width, first_fit, batch_dims=1), fallback_width)
  crop_height = tf.where(found, tf.gather(tried_height, first_fit, batch_dims=1), fallback_height)

  def offset(offset_seed, crop, side):
    uniform = _uniform(offset_seed, [num], 0.0, 1.0)
    if whole_pixels:
      placed = tf.minimum(tf.floor(uniform * (side - crop + 1)), side - crop)
      return tf.where(found, placed, tf.floor((side - crop) / 2))
    return tf.where(found, uniform * (side - crop), (side - crop) / 2)

  windows = tf.stack([
      offset(top_seed, crop_height, height_f),
      offset(left_seed, crop_width, width_f), crop_height, crop_width
  ],
                     axis=1)
  return tf.cast(windows, tf.int32) if whole_pixels else windows


def _kernel(x, method: str) -> tf.Tensor:
  """The resize kernel at distances x >= 0 (in input pixels): Keys cubic (a = -0.5, as TF's and
  PIL's bicubic) or the triangle (bilinear)."""
  if method == 'bicubic':
    return tf.where(x < 1.0, (1.5 * x - 2.5) * x * x + 1.0,
                    tf.where(x < 2.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, 0.0))
  if method == 'bilinear':
    return tf.maximum(0.0, 1.0 - x)
  raise ValueError(f"resize method '{method}': use 'bicubic' or 'bilinear'")


def _filter_weights(starts, lengths, in_size, out_size, method: str) -> tf.Tensor:
  """float32 [n, out_size, in_size]: the rows of a 1-D resize of windows [start, start + length)
  of a line of `in_size` pixels to `out_size` pixels, as tf.image.resize(antialias=True) and
  PIL's resize weigh them: the kernel (Keys cubic, a = -0.5, or the triangle) centred on each
  output pixel's centre, widened by length / out_size when it shrinks, zero outside the window,
  normalised to sum 1."""
  starts = tf.cast(starts, tf.float32)[:, None, None]
  lengths = tf.cast(lengths, tf.float32)[:, None, None]
  out_size = tf.cast(out_size, tf.float32)
  scale = lengths / out_size
  centres = starts + (tf.range(out_size)[None, :, None] + 0.5) * scale
  pixels = tf.range(tf.cast(in_size, tf.float32))[None, None, :] + 0.5
  x = tf.abs(pixels - centres) / tf.maximum(scale, 1.0)
  weights = _kernel(x, method)
  weights = tf.where((pixels > starts) & (pixels < starts + lengths), weights, 0.0)
  return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)


def window_crops(image,
                 windows,
                 size: int,
                 method: str = 'bicubic',
                 *,
                 unit: bool = True) -> tf.Tensor:
  """float32 [n, size, size, C] in [0, 1]: each window (top, left, height, width) of a decoded
  image, resized to size x size (PIL's crop then resize), one tf.image.resize per window; with
  unit=False in the image's range, unclipped."""
  views = []
  for window in tf.unstack(windows, num=windows.shape[0]):
    crop = tf.slice(image, tf.concat([window[:2], [0]], 0), tf.concat([window[2:], [-1]], 0))
    views.append(_resize(crop, size, size, method))
  views = tf.ensure_shape(tf.stack(views), [len(views), size, size, image.shape[-1]])
  return _unit(views, image.dtype) if unit else views


def jpeg_window_crops(encoded,
                      windows,
                      size: int,
                      num_channels: int,
                      method: str = 'bicubic') -> tf.Tensor:
  """window_crops of a JPEG decoding only each window (tf.image.decode_and_crop_jpeg)."""
  views = [
      _resize(
          tf.image.decode_and_crop_jpeg(encoded,
                                        window,
                                        channels=num_channels,
                                        dct_method=_DCT_METHOD), size, size, method)
      for window in tf.unstack(windows, num=windows.shape[0])
  ]
  return _unit(tf.ensure_shape(tf.stack(views), [len(views), size, size, num_channels]), tf.uint8)


def _grid_weights(starts, lengths, in_size: int, out_size: int, method: str) -> tf.Tensor:
  """float32 [n, out_size, in_size]: each window [start, start + length) of a line of `in_size`
  pixels (starts and lengths anywhere between pixels) sampled at out_size points spread evenly
  from its first pixel centre to its last, on tf.image.crop_and_resize's grid (a window of the
  whole line samples every pixel centre); the kernel (the triangle: crop_and_resize's bilinear,
  or Keys cubic, a = -0.5) is normalised over the pixels it reaches."""
  starts = tf.cast(starts, tf.float32)[:, None, None]
  lengths = tf.cast(lengths, tf.float32)[:, None, None]
  steps = tf.range(out_size, dtype=tf.float32)[None, :, None] / max(out_size - 1, 1)
  positions = (starts + steps * lengths) * ((in_size - 1) / in_size)
  x = tf.abs(tf.range(in_size, dtype=tf.float32)[None, None, :] - positions)
  weights = _kernel(x, method)
  return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)


def _small_image_crops(image, seed, num: int, size: int, scale, min_size: int,
                       method: str) -> tf.Tensor:
  """float32 [num, size, size, C] (the image's range) of a small image of a static shape whose
  shorter side is below min_size (module docstring): upscaled (bicubic) to a shorter side of
  min_size and rounded back to its dtype, as if decoded at that size; RandomResizedCrop windows
  anywhere between its pixels (crop_windows(whole_pixels=False)), each sampled on
  crop_and_resize's grid (_grid_weights) by two matmuls."""
  height, width = image.shape[0], image.shape[1]
  long = min_size * max(height, width) // min(height, width)  # resized_shape's, in Python
  new_height, new_width = (min_size, long) if height <= width else (long, min_size)
  upscaled = tf.cast(
      _as_dtype(_resize(tf.cast(image, tf.float32), new_height, new_width), image.dtype),
      tf.float32)
  windows = crop_windows(seed, num, scale, new_height, new_width, whole_pixels=False)
  rows = _grid_weights(windows[:, 0], windows[:, 2], new_height, size, method)  # [n, S, H]
  columns = _grid_weights(windows[:, 1], windows[:, 3], new_width, size, method)  # [n, S, W]
  resized = tf.einsum('nsh,hwc->nswc', rows, upscaled)
  return tf.einsum('ntw,nswc->nstc', columns, resized)


def _is_small(image, small_image: bool | None) -> bool:
  """Whether to crop by matmuls: as told, else when the image's static size is small."""
  if small_image is not None:
    return small_image
  height, width = image.shape[0], image.shape[1]
  return height is not None and width is not None and height * width <= SMALL_IMAGE_PIXELS


def _upscaled_small(image, small_image: bool | None, min_size: int) -> bool:
  """Whether a decoded image is a small one (_is_small) with its shorter side below min_size,
  cropped by _small_image_crops; a small image at least that size is cropped as any other."""
  if not _is_small(image, small_image):
    return False
  height, width = image.shape[0], image.shape[1]
  if height is None or width is None:
    raise ValueError('a small image is cropped by matmuls of its static size: give the image a '
                     'static shape (tf.ensure_shape) or small_image=False')
  return min(height, width) < min_size


def _decoded_crops(image, seed, num: int, size: int, scale, *, min_size: int, method: str,
                   small_image: bool | None, round_uint8: bool) -> tf.Tensor:
  """random_resized_crops of a decoded image: [num, size, size, C], uint8 when the image is
  uint8 and round_uint8, else float32 in [0, 1]."""
  if _upscaled_small(image, small_image, min_size):
    views = _small_image_crops(image, seed, num, size, scale, min_size, method)
  else:
    shape = tf.shape(image)
    views = window_crops(image,
                         crop_windows(seed, num, scale, shape[0], shape[1]),
                         size,
                         method,
                         unit=False)
  views = tf.ensure_shape(views, [num, size, size, image.shape[-1]])
  if image.dtype == tf.uint8 and round_uint8:
    return _as_dtype(views, tf.uint8)
  return _unit(views, image.dtype)


def random_resized_crops(image,
                         seed,
                         num: int,
                         size: int,
                         scale: Sequence[float],
                         *,
                         min_size: int = 0,
                         num_channels: int | None = None,
                         method: str = 'bicubic',
                         small_image: bool | None = None,
                         round_uint8: bool = False) -> tf.Tensor:
  """`num` RandomResizedCrop views [num, size, size, C] in [0, 1] of an image, encoded or decoded
  (module docstring): a JPEG giving one view decodes only its window. `small_image` (None: from
  the image's static shape) says whether the image is a small one of a known size: one below
  `min_size` is upscaled to it and cropped between its pixels (module docstring); with
  round_uint8 the crops of a uint8 or encoded image come as uint8 (rounded as PIL's)."""
  crops = functools.partial(_decoded_crops,
                            seed=seed,
                            num=num,
                            size=size,
                            scale=scale,
                            min_size=min_size,
                            method=method,
                            round_uint8=round_uint8)
  if image.dtype != tf.string:
    return crops(image, small_image=small_image)
  if num > _PARTIAL_DECODE_MAX_VIEWS or small_image:
    return crops(decode(image, num_channels), small_image=small_image)

  def partial():
    shape = tf.image.extract_jpeg_shape(image)
    views = jpeg_window_crops(image, crop_windows(seed, num, scale, shape[0], shape[1]), size,
                              num_channels, method)
    return _as_dtype(views * 255, tf.uint8) if round_uint8 else views

  def whole():
    return crops(decode(image, num_channels), small_image=False)

  views = tf.cond(is_jpeg(image), partial, whole)
  return tf.ensure_shape(views, [num, size, size, num_channels])


# --------------------------------------------------------------------------- augmentation


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


def _jitter_factors(seed, num: int, strengths: Sequence[float]) -> dict[str, tf.Tensor]:
  """ColorJitter.get_params for `num` views: each op's factor [num, 1, 1, 1], only for the
  strengths > 0, and 'order' [num], each view's order of the ops (an index into JITTER_ORDERS)."""
  brightness, contrast, saturation, hue = strengths
  seeds = _seeds(seed, 5)
  factors = {}
  if brightness > 0:
    factors['brightness'] = _factors(seeds[0], num, brightness)
  if contrast > 0:
    factors['contrast'] = _factors(seeds[1], num, contrast)
  if saturation > 0:
    factors['saturation'] = _factors(seeds[2], num, saturation)
  if hue > 0:
    factors['hue'] = _uniform(seeds[3], [num, 1, 1, 1], -hue, hue)
  factors['order'] = _jitter_order_index(seeds[4], num)
  return factors


def _jitter_order_index(seed, num: int) -> tf.Tensor:
  """[num] int32: each view's order of the four ops, an index into JITTER_ORDERS drawn
  uniformly: a uniform random permutation, as torchvision's torch.randperm(4)."""
  return tf.random.stateless_uniform([num],
                                     seed,
                                     minval=0,
                                     maxval=len(JITTER_ORDERS),
                                     dtype=tf.int32,
                                     alg=_RNG)


def jitter_orders(seed, num: int) -> tf.Tensor:
  """[num, 4] int32: the order of JITTER_OPS' indices that views drawing from `seed` apply."""
  return tf.gather(tf.constant(JITTER_ORDERS, tf.int32), _jitter_order_index(seed, num))


def _jitter_op(name: str, views, factor) -> tf.Tensor:
  """One of ColorJitter's ops (JITTER_OPS) on [n, S, S, C] with per-view factors [n, 1, 1, 1]."""
  if name == 'brightness':
    return _blend(views, 0.0, factor)
  if name == 'contrast':
    return _blend(views, tf.reduce_mean(_gray(views), axis=[1, 2, 3], keepdims=True), factor)
  if name == 'saturation':
    return _blend(views, _gray(views), factor)
  return _shift_hue(views, factor)


def _jitter_steps(order_index, ops: Sequence[int]) -> tf.Tensor:
  """[n, len(ops)] int32: per view, the positions in `ops` (JITTER_OPS' indices) in the order
  the view applies them, from its order's index into JITTER_ORDERS (a table lookup)."""
  table = [[ops.index(op) for op in order if op in ops] for order in JITTER_ORDERS]
  return tf.gather(tf.constant(table, tf.int32), order_index)


def _jitter(views, factors: dict[str, tf.Tensor]) -> tf.Tensor:
  """ColorJitter's ops with the drawn `factors` in each view's drawn order. One view: a
  switch per step runs its op alone (under XLA, only that op's work is done); several: every op
  on the whole stack at each step, each view keeping its own op's result (op by op in tf.data,
  a few large ops cost less than a few per view). Saturation and hue leave one channel as is."""
  colour = views.shape[-1] == 3
  ops = [
      index for index, name in enumerate(JITTER_OPS)
      if name in factors and (colour or name in ('brightness', 'contrast'))
  ]
  applied = [
      functools.partial(_jitter_op, JITTER_OPS[op], factor=factors[JITTER_OPS[op]]) for op in ops
  ]
  if len(applied) <= 1:  # no order to follow
    return applied[0](views) if applied else views
  steps = _jitter_steps(factors['order'], ops)
  for step in range(len(ops)):
    if views.shape[0] == 1:
      views = tf.switch_case(steps[0, step], [functools.partial(f, views) for f in applied])
    else:
      step_op = tf.reshape(steps[:, step], [-1, 1, 1, 1])
      results = [apply(views) for apply in applied]
      views = functools.reduce(
          lambda kept, position: tf.where(step_op == position, results[position], kept),
          range(1, len(ops)), results[0])
  return views


def color_jitter(views, seed, strengths: Sequence[float]) -> tf.Tensor:
  """torchvision's ColorJitter on [n, S, S, C]: brightness, contrast, saturation and hue in an
  order drawn per view (a uniform permutation, as torch.randperm(4)); each factor
  U(1 - s, 1 + s) (hue: shift U(-s, s)), drawn per view."""
  return _jitter(views, _jitter_factors(seed, views.shape[0], strengths))


def grayscale(views) -> tf.Tensor:
  return tf.tile(_gray(views), [1] * (views.shape.rank - 1) + [views.shape[-1]])


def blur_radius(size: int, max_sigma: float) -> int:
  """Half-width of the blur kernel: 3 sigma, but at most a quarter of the view (at least 1)."""
  return max(1, min(math.ceil(3 * max_sigma), size // 4))


def gaussian_blur(views, sigmas, radius: int) -> tf.Tensor:
  """Separable Gaussian blur of [n, S, S, C] with one sigma per view and mirrored edges.

  Sums of 2r + 1 shifted copies, rows then columns, the columns' shifted by C along the
  flattened (S * C) rows: XLA fuses each pass into one loop of contiguous loads, 1.7x faster
  than shifting [S, S, C] along S, and 5x faster than a depthwise convolution (XLA:CPU runs
  those slowly)."""
  num, size, _, channels = views.shape
  offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernels = tf.exp(-0.5 * tf.square(offsets / tf.reshape(sigmas, [-1, 1])))
  kernels = kernels / tf.reduce_sum(kernels, axis=1, keepdims=True)
  taps = [kernels[:, tap, None, None] for tap in range(2 * radius + 1)]
  flat = tf.reshape(views, [num, size, size * channels])
  padded = tf.pad(flat, [[0, 0], [radius, radius], [0, 0]], 'SYMMETRIC')
  flat = tf.add_n([weight * padded[:, tap:tap + size] for tap, weight in enumerate(taps)])
  padded = tf.pad(tf.reshape(flat, views.shape), [[0, 0], [0, 0], [radius, radius], [0, 0]],
                  'SYMMETRIC')
  padded = tf.reshape(padded, [num, size, (size + 2 * radius) * channels])
  flat = tf.add_n([
      weight * padded[:, :, tap * channels:(tap + size) * channels]
      for tap, weight in enumerate(taps)
  ])
  return tf.reshape(flat, views.shape)


def solarize(views) -> tf.Tensor:
  return tf.where(views < _SOLARIZE_THRESHOLD, views, 1.0 - views)


def normalize(image, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  channels = image.shape[-1]
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f'data.mean={tuple(mean)} and data.std={tuple(std)} need one value per '
                     f'channel and the images have {channels}: set both to {channels} values')
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _blur_view(view, sigma, max_radius: int) -> tf.Tensor:
  """gaussian_blur of one view [1, S, S, C] with the kernel cut at the first of 3 radii (a third,
  two thirds, all of max_radius) that is at least 3 sigma: a Gaussian's mass beyond 3 sigma is
  0.3%, and the smaller sigmas of U(0.1, 2) cost a third less."""
  radii = sorted({max(1, math.ceil(max_radius * k / 3)) for k in (1, 2, 3)})
  bucket = tf.reduce_sum(tf.cast(3 * sigma > tf.constant(radii[:-1], tf.float32), tf.int32))
  return tf.switch_case(bucket, [lambda r=r: gaussian_blur(view, sigma[None], r) for r in radii])


def _where_heads(apply, views, heads, probabilities: Sequence[float]) -> tf.Tensor:
  """Views [n, S, S, C] with apply(views[i:i + 1], i) where heads[i] (scalar bools): always for
  probability 1, never for 0, else in a conditional, so that under XLA the work is done for
  the views that need it only."""
  out = []
  for i, probability in enumerate(probabilities):
    view = views[i:i + 1]
    if probability >= 1:
      out.append(apply(view, i))
    elif probability <= 0:
      out.append(view)
    else:
      out.append(tf.cond(heads[i], lambda view=view, i=i: apply(view, i), lambda view=view: view))
  return tf.concat(out, axis=0)


def _group_seeds(seed, group: int) -> list[tf.Tensor]:
  """The 8 seeds of view group `group` (0: global, 1: local) of an example: [0] for the crop
  windows, [1:] for the augmentation."""
  return _seeds(_seeds(seed, 2)[group], 8)


def _augment(views, seed, *, group: int, flip: bool, jitter: tuple, color_jitter_prob: float,
             grayscale_prob: float, blur_sigma: tuple, blur_probs: tuple, solarize_probs: tuple,
             mean: tuple, std: tuple, per_view: bool) -> tf.Tensor:
  """DINO's augmentation of one example's crops [n, S, S, C] (uint8, or float32 in [0, 1]) of
  view group `group`, after the crop: flip, colour jitter, grayscale, blur, solarisation, then
  normalisation; float32. per_view (under XLA): jitter and blur in a conditional per view, the
  blur's kernel cut at 3 sigma (_blur_view); else (op by op, where each op's overhead outweighs
  the work on small crops) on the whole stack, kept where the coins say so."""
  num, size = views.shape[0], views.shape[1]
  views = tf.cast(views, tf.float32) * (1 / 255) if views.dtype == tf.uint8 else views
  seeds = _group_seeds(seed, group)

  def where_heads(index, probabilities, apply_one, apply_all):
    if per_view:
      heads = _coins(seeds[index], probabilities)[:, 0, 0, 0]
      return _where_heads(apply_one, views, heads, probabilities)
    return tf.where(_coins(seeds[index], probabilities), apply_all(), views)

  if flip:
    views = tf.where(_coins(seeds[1], [0.5] * num), tf.reverse(views, axis=[2]), views)
  if color_jitter_prob > 0:
    factors = _jitter_factors(seeds[3], num, jitter)
    views = where_heads(
        2, [color_jitter_prob] * num, lambda view, i: _jitter(view, {
            key: value[i:i + 1] for key, value in factors.items()
        }), lambda: _jitter(views, factors))
  if grayscale_prob > 0 and views.shape[-1] == 3:
    views = tf.where(_coins(seeds[4], [grayscale_prob] * num), grayscale(views), views)
  if max(blur_probs) > 0:
    sigmas = _uniform(seeds[6], [num], *blur_sigma)
    radius = blur_radius(size, max(blur_sigma))
    views = where_heads(5, blur_probs, lambda view, i: _blur_view(view, sigmas[i], radius),
                        lambda: gaussian_blur(views, sigmas, radius))
  if max(solarize_probs) > 0:
    views = tf.where(_coins(seeds[7], solarize_probs), solarize(views), views)
  return normalize(views, mean, std)


@functools.lru_cache(maxsize=64)
def _augmenter(shape: tuple, dtype: tf.DType, **options):
  """_augment over a batch of crops [b, n, S, S, C] (shape without b) and their examples'
  seeds [b, 2], compiled by XLA (one program per batch size); `options` are _augment's keyword
  arguments, hashable. Each example goes through the same loop body, so its views do not depend
  on the batch it is in."""

  @tf.function(
      jit_compile=True,
      autograph=False,
      input_signature=[tf.TensorSpec([None, *shape], dtype),
                       tf.TensorSpec([None, 2], tf.int64)])
  def augment(views, seeds):
    return tf.map_fn(lambda example: _augment(example[0], example[1], per_view=True, **options),
                     (views, seeds),
                     fn_output_signature=tf.TensorSpec(shape, tf.float32))

  return augment


def _group_options(aug_config, group: int, mean, std) -> tuple:
  """_augment's options for view group `group` (0: the 2 global views, 1: the local ones), as a
  hashable tuple of (name, value)."""
  blur_global1, blur_global2, blur_local = (float(p) for p in aug_config.blur_prob)
  if group == 0:
    blur_probs = (blur_global1, blur_global2)
    solarize_probs = (0.0, float(aug_config.solarize_prob))
  else:
    blur_probs = (blur_local,) * aug_config.num_local
    solarize_probs = (0.0,) * aug_config.num_local
  floats = lambda values: tuple(float(x) for x in values)
  return tuple(
      dict(group=group,
           flip=bool(aug_config.flip),
           jitter=floats(aug_config.color_jitter),
           color_jitter_prob=float(aug_config.color_jitter_prob),
           grayscale_prob=float(aug_config.grayscale_prob),
           blur_sigma=floats(aug_config.blur_sigma),
           blur_probs=blur_probs,
           solarize_probs=solarize_probs,
           mean=floats(mean),
           std=floats(std)).items())


def multi_crop_views(image,
                     seed,
                     aug_config,
                     *,
                     min_size: int = 0,
                     num_channels: int | None = None,
                     small_image: bool | None = None,
                     gram_size: int = 0) -> dict[str, tf.Tensor]:
  """The crop stage of multi-crop: {'global_crops': [2, G, G, C], 'local_crops': [L, l, l, C]}
  un-augmented, uint8 for uint8 or encoded images (float32 in [0, 1] for float ones), from one
  image, encoded (decoded whole, into `num_channels`) or decoded; `min_size` and `small_image`
  as in random_resized_crops. With `gram_size`, also 'gram_crops' [2, S, S, C]: the global
  crops' windows (the same seed) at that size, DINOv3's Gram teacher crops. augment_views
  finishes them."""
  image = _decoded(image, num_channels)
  crops = functools.partial(random_resized_crops,
                            image,
                            min_size=min_size,
                            method=aug_config.crop_interpolation,
                            small_image=small_image,
                            round_uint8=True)
  global_crops = crops(_group_seeds(seed, 0)[0], 2, aug_config.global_size, aug_config.global_scale)
  gram = {
      'gram_crops': crops(_group_seeds(seed, 0)[0], 2, gram_size, aug_config.global_scale)
  } if gram_size else {}
  num_local, local_size = aug_config.num_local, aug_config.local_size
  if num_local:
    local_crops = crops(_group_seeds(seed, 1)[0], num_local, local_size, aug_config.local_scale)
  else:
    local_crops = tf.zeros([0, local_size, local_size, image.shape[-1]], global_crops.dtype)
  return {'global_crops': global_crops, 'local_crops': local_crops, **gram}


def gram_teacher_views(views, seed, *, flip: bool, mean: Sequence[float],
                       std: Sequence[float]) -> tf.Tensor:
  """One example's Gram teacher crops [2, S, S, C] (multi_crop_views) finished as DINOv3 finishes
  them without distortions: the global crops' flips (the same draws), then normalisation."""
  views = tf.cast(views, tf.float32) * (1 / 255) if views.dtype == tf.uint8 else views
  if flip:
    flips = _coins(_group_seeds(tf.cast(seed, tf.int64), 0)[1], [0.5] * views.shape[0])
    views = tf.where(flips, tf.reverse(views, axis=[2]), views)
  return normalize(views, mean, std)


@functools.lru_cache(maxsize=16)
def _gram_finisher(shape: tuple, dtype: tf.DType, flip: bool, mean: tuple, std: tuple):
  """gram_teacher_views over a batch [b, 2, S, S, C] and its seeds [b, 2], compiled by XLA."""

  @tf.function(
      jit_compile=True,
      autograph=False,
      input_signature=[tf.TensorSpec([None, *shape], dtype),
                       tf.TensorSpec([None, 2], tf.int64)])
  def finish(views, seeds):
    return tf.map_fn(
        lambda example: gram_teacher_views(example[0], example[1], flip=flip, mean=mean, std=std),
        (views, seeds),
        fn_output_signature=tf.TensorSpec(shape, tf.float32))

  return finish


def _checked_options(aug_config, channels: int, mean, std) -> list[tuple]:
  normalize(tf.zeros([channels]), mean, std)  # a mismatch raises its one-line error here
  return [_group_options(aug_config, group, mean, std) for group in range(2)]


def augment_example(crops: dict, seed, aug_config, mean: Sequence[float],
                    std: Sequence[float]) -> dict[str, tf.Tensor]:
  """The augmentation stage of multi-crop on one example, op by op (in tf.data): crops
  {'global_crops': [2, G, G, C], 'local_crops': [L, l, l, C]} from multi_crop_views -> the same
  augmented and normalised, float32 (and 'gram_crops', if any, by gram_teacher_views)."""
  seed = tf.cast(seed, tf.int64)
  keys = ('global_crops', 'local_crops')
  options = _checked_options(aug_config, crops[keys[0]].shape[-1], mean, std)
  out = {
      key:
          _augment(crops[key], seed, per_view=False, **dict(group_options))
          if crops[key].shape[0] else tf.zeros(crops[key].shape, tf.float32)
      for key, group_options in zip(keys, options)
  }
  if 'gram_crops' in crops:
    out['gram_crops'] = gram_teacher_views(crops['gram_crops'],
                                           seed,
                                           flip=bool(aug_config.flip),
                                           mean=mean,
                                           std=std)
  return out


def augment_views(batch: dict, seeds, aug_config, mean: Sequence[float],
                  std: Sequence[float]) -> dict[str, tf.Tensor]:
  """augment_example on a batch, with the examples' seeds [b, 2]: {'global_crops':
  [b, 2, G, G, C], 'local_crops': [b, L, l, l, C]} -> the same augmented and normalised,
  float32, by one XLA program per view group and batch size (module docstring); 'gram_crops',
  if any, by gram_teacher_views."""
  seeds = tf.cast(seeds, tf.int64)
  keys = ('global_crops', 'local_crops')
  options = _checked_options(aug_config, batch[keys[0]].shape[-1], mean, std)
  out = {}
  for key, group_options in zip(keys, options):
    views = tf.convert_to_tensor(batch[key])
    if views.shape[1] == 0:
      out[key] = tf.zeros(views.shape, tf.float32)
      continue
    out[key] = _augmenter(tuple(views.shape[1:]), views.dtype, **dict(group_options))(views, seeds)
  if 'gram_crops' in batch:
    views = tf.convert_to_tensor(batch['gram_crops'])
    finish = _gram_finisher(tuple(views.shape[1:]), views.dtype, bool(aug_config.flip),
                            tuple(float(x) for x in mean), tuple(float(x) for x in std))
    out['gram_crops'] = finish(views, seeds)
  return out


def multi_crop(image,
               seed,
               aug_config,
               mean: Sequence[float],
               std: Sequence[float],
               *,
               min_size: int = 0,
               num_channels: int | None = None,
               small_image: bool | None = None) -> dict[str, tf.Tensor]:
  """{'global_crops': [2, G, G, C], 'local_crops': [L, l, l, C]}, normalised, from one image
  (encoded or decoded): multi_crop_views then augment_example."""
  seed = tf.cast(seed, tf.int64)
  crops = multi_crop_views(image,
                           seed,
                           aug_config,
                           min_size=min_size,
                           num_channels=num_channels,
                           small_image=small_image)
  return augment_example(crops, seed, aug_config, mean, std)


def linear_train_view(image,
                      seed,
                      *,
                      size: int,
                      scale: Sequence[float] = LINEAR_SCALE,
                      flip: bool,
                      mean: Sequence[float],
                      std: Sequence[float],
                      min_size: int = 0,
                      num_channels: int | None = None,
                      small_image: bool | None = None) -> tf.Tensor:
  """The training view of the linear evaluation: [size, size, C], normalised.

  torchvision's RandomResizedCrop(size, scale) (default scale (0.08, 1.0); bilinear, its default,
  as in DINO's eval_linear.py) of the image at its own resolution (a JPEG decodes only the
  window), then, when `flip`, a horizontal flip with probability 0.5; the seed decides both.
  """
  crop_seed, flip_seed = _seeds(tf.cast(seed, tf.int64), 2)
  views = random_resized_crops(image,
                               crop_seed,
                               1,
                               size,
                               scale,
                               min_size=min_size,
                               num_channels=num_channels,
                               method='bilinear',
                               small_image=small_image)
  if flip:
    views = tf.where(_coins(flip_seed, [0.5]), tf.reverse(views, axis=[2]), views)
  return normalize(views[0], mean, std)


# --------------------------------------------------------------------------- evaluation


def eval_resize(size: int, resize: int = 0) -> int:
  """The shorter side of the evaluation's resize: `resize`, or when 0, round(size * 256 / 224)
  (DINO's Resize(256) before CenterCrop(224))."""
  resize = resize or round(size * EVAL_RESIZE_RATIO)
  if resize < size:
    raise ValueError(f'data.eval_resize={resize} is smaller than data.image_size={size}: the '
                     'centre crop must fit inside the resized image; set eval_resize >= '
                     f'{size} (0: {round(size * EVAL_RESIZE_RATIO)})')
  return resize


def _center_offset(resized: int, size: int) -> int:
  return int(round((resized - size) / 2))  # Python's round, half to even, as CenterCrop's


def center_view(image,
                size: int,
                mean: Sequence[float],
                std: Sequence[float],
                *,
                resize: int = 0,
                num_channels: int | None = None,
                image_shape: Sequence[int] | None = None) -> tf.Tensor:
  """The un-augmented view of evaluation and of the prior pass, [size, size, C] normalised:
  torchvision's Resize(eval_resize(size, resize)) + CenterCrop(size), as DINO evaluates.

  The shorter side is resized (bicubic, antialiased) to R = eval_resize(size, resize) and the
  longer to int(R * long / short), giving H' x W'; then the centre size x size is kept, from
  row round((H' - size) / 2) and column round((W' - size) / 2) (half to even, as CenterCrop's
  Python round). The image may be encoded (decoded whole) or decoded; `image_shape` (H, W), when
  every image has it, lets a small one (at most SMALL_IMAGE_PIXELS) be resized by two matmuls
  with constant weights, the resize's. A small image is upscaled the same way: the 8x8 digits
  with image_size 16 become 18x18 (R = round(16 * 256 / 224)) whose centre 16x16 is kept,
  dropping one upscaled pixel (half a digit pixel) on each side, the digits' blank margin.
  """
  image = _decoded(image, num_channels)
  if image_shape is not None:
    image = tf.ensure_shape(image, [*image_shape, image.shape[-1]])
  if _is_small(image, None):
    height, width = image.shape[0], image.shape[1]
    short = eval_resize(size, resize)
    long = short * max(height, width) // min(height, width)
    new_height, new_width = (short, long) if height <= width else (long, short)
    top, left = _center_offset(new_height, size), _center_offset(new_width, size)
    with tf.init_scope():  # constants, computed once when the function is traced
      rows = _filter_weights([0], [height], height, new_height, 'bicubic')[0].numpy()
      columns = _filter_weights([0], [width], width, new_width, 'bicubic')[0].numpy()
    view = tf.einsum('sh,hwc->swc', rows[top:top + size], tf.cast(image, tf.float32))
    view = tf.einsum('tw,swc->stc', columns[left:left + size], view)
  else:
    shape = tf.shape(image)
    new_height, new_width = resized_shape(shape[0], shape[1], eval_resize(size, resize))
    resized = _resize(image, new_height, new_width)
    top = tf.cast(tf.round((new_height - size) / 2), tf.int32)  # tf.round: half to even
    left = tf.cast(tf.round((new_width - size) / 2), tf.int32)
    view = resized[top:top + size, left:left + size]
  view = _unit(view, image.dtype)
  return normalize(tf.ensure_shape(view, [size, size, image.shape[-1]]), mean, std)
