"""Augmentation (kldino/data/augment.py): multi-crop views and their photometric transforms, crops
cut from the full-resolution image, DINO's evaluation view, partial JPEG decoding.

Expected values are computed independently: numpy and scipy for the transforms, torchvision's
RandomResizedCrop / Resize / CenterCrop arithmetic written out in Python, and PIL (DINO's loader and
resize) for pixels. Tolerances are measured (the numbers in each test) and explained where they are
set.
"""
import collections
import colorsys
import io
import itertools
import math

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import ndimage
from scipy import stats

from kldino.data import augment, datasets, pipeline
from tests.data.helpers import (encode, jpeg, jpeg_config, levels, one_line_error, smooth_image)
from tests.helpers import config_module

RNG = np.random.default_rng(0)


def checkerboard(height: int, width: int, cell: int) -> np.ndarray:
  y, x = np.mgrid[:height, :width]
  board = (((y // cell + x // cell) % 2) * 255).astype(np.uint8)
  return np.repeat(board[..., None], 3, axis=-1)


def pil_eval_view(image: Image.Image, resize: int = 256, size: int = 224) -> np.ndarray:
  """torchvision's Resize(resize, BICUBIC) + CenterCrop(size) of a PIL image, written out."""
  width, height = image.size
  if width <= height:
    new_width, new_height = resize, int(resize * height / width)
  else:
    new_width, new_height = int(resize * width / height), resize
  resized = image.resize((new_width, new_height), Image.BICUBIC)
  top = int(round((new_height - size) / 2.0))
  left = int(round((new_width - size) / 2.0))
  return np.asarray(resized.crop((left, top, left + size, top + size)), np.float32)


def torchvision_fits(height: int, width: int, scale, rng, tries: int = 10) -> bool:
  """Whether torchvision's RandomResizedCrop.get_params finds a window in `tries` tries."""
  area = height * width
  for _ in range(tries):
    target = area * rng.uniform(*scale)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      return True
  return False


# --------------------------------------------------------------------------- multi-crop views


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


def torchvision_jitter_order(rng) -> np.ndarray:
  """ColorJitter.get_params' order rule, transcribed (torchvision is not a dependency):
  fn_idx = torch.randperm(4), a uniform random permutation of (brightness, contrast, saturation,
  hue)."""
  return rng.permutation(4)


def order_counts(orders: np.ndarray) -> np.ndarray:
  """How often each of the 24 permutations of range(4) occurs among the rows of `orders`."""
  names = [tuple(p) for p in itertools.permutations(range(4))]
  counts = collections.Counter(tuple(row) for row in orders)
  return np.array([counts[name] for name in names])


def test_jitter_orders_are_torchvisions_uniform_permutations():
  """Each view's order is a permutation of the four ops; over 24000 views each of the 24 orders
  is as likely (chi-square against uniform, and against the same number of torchvision-rule
  draws), each op in each position a quarter of the time (5 standard errors: 0.014); a view's
  order is a function of its seed alone."""
  num = 24_000
  orders = augment.jitter_orders(tf.constant([5, 6], tf.int64), num).numpy()
  np.testing.assert_array_equal(np.sort(orders, axis=1), np.tile(np.arange(4), (num, 1)))
  rng = np.random.default_rng(0)
  reference = np.stack([torchvision_jitter_order(rng) for _ in range(num)])
  ours, theirs = order_counts(orders), order_counts(reference)
  assert stats.chisquare(ours).pvalue > 1e-3 and stats.chisquare(theirs).pvalue > 1e-3
  assert stats.chi2_contingency(np.stack([ours, theirs])).pvalue > 1e-3
  for draws in (orders, reference):
    shares = np.stack([(draws == op).mean(axis=0) for op in range(4)])  # [op, position]
    np.testing.assert_allclose(shares, 0.25, atol=0.014)
  again = augment.jitter_orders(tf.constant([5, 6], tf.int64), num).numpy()
  other = augment.jitter_orders(tf.constant([5, 7], tf.int64), num).numpy()
  np.testing.assert_array_equal(again, orders)
  assert (other != orders).any(axis=1).mean() > 0.9


def numpy_jitter(view: np.ndarray, order, factors: dict) -> np.ndarray:
  """ColorJitter's ops on one view [S, S, C] in `order` (indices of brightness, contrast,
  saturation, hue), in numpy and colorsys: blends with black, the mean luma and the luma, and a
  hue rotation in HSV; saturation and hue leave a one-channel view as is."""
  luma = lambda x: x @ np.array([0.2989, 0.5870, 0.1140]) if x.shape[-1] == 3 else x[..., 0]
  blend = lambda x, reference, factor: np.clip(reference + factor * (x - reference), 0, 1)
  view = view.astype(np.float64)
  for op in order:
    name = augment.JITTER_OPS[op]
    if name not in factors or (op >= 2 and view.shape[-1] == 1):
      continue
    factor = factors[name]
    if name == 'brightness':
      view = blend(view, 0.0, factor)
    elif name == 'contrast':
      view = blend(view, luma(view).mean(), factor)
    elif name == 'saturation':
      view = blend(view, luma(view)[..., None], factor)
    else:
      hsv = [colorsys.rgb_to_hsv(*pixel) for pixel in view.reshape(-1, 3)]
      rgb = [colorsys.hsv_to_rgb((h + factor) % 1.0, s, v) for h, s, v in hsv]
      view = np.clip(np.reshape(rgb, view.shape), 0, 1)
  return view


@pytest.mark.parametrize('channels,strengths', [(3, (0.4, 0.4, 0.2, 0.1)),
                                                (1, (0.4, 0.4, 0.0, 0.0))])
def test_jitter_applies_the_ops_in_each_views_drawn_order(channels, strengths):
  """color_jitter (the whole stack, as in tf.data) and _jitter of one view compiled by XLA (as
  augment_views runs it) equal the four ops applied in each view's drawn order (numpy_jitter);
  the views drew several orders, and the fixed order brightness, contrast, saturation, hue gives
  other pixels for some of them (clipping makes the order matter)."""
  num, seed = 12, tf.constant([3, 1], tf.int64)
  views = RNG.uniform(0, 1, (num, 8, 8, channels)).astype(np.float32)
  draws = augment._jitter_factors(seed, num, strengths)  # pylint: disable=protected-access
  orders = np.array(augment.JITTER_ORDERS)[draws['order'].numpy()]
  factors = [{
      k: float(v.numpy()[i].item()) for k, v in draws.items() if k != 'order'
  } for i in range(num)]
  expected = np.stack([numpy_jitter(v, o, f) for v, o, f in zip(views, orders, factors)])
  stacked = augment.color_jitter(tf.constant(views), seed, strengths).numpy()
  np.testing.assert_allclose(stacked, expected, atol=2e-6)
  one_view = tf.function(augment._jitter, jit_compile=True)  # pylint: disable=protected-access
  for i in range(num):
    view = one_view(views[i:i + 1], {key: value[i:i + 1] for key, value in draws.items()})
    np.testing.assert_allclose(view.numpy()[0], expected[i], atol=2e-6)
  assert len({tuple(order) for order in orders}) > 3
  fixed = np.stack([numpy_jitter(v, range(4), f) for v, f in zip(views, factors)])
  assert np.abs(fixed - expected).max() > 0.01


def test_center_view_resizes_and_normalises():
  image = random_image(size=8)
  view = augment.center_view(tf.constant(image), 16, (0.5,) * 3, (0.25,) * 3).numpy()
  assert view.shape == (16, 16, 3)
  same_size = augment.center_view(tf.constant(image), 8, (0.5,) * 3, (0.25,) * 3, resize=8).numpy()
  np.testing.assert_allclose(same_size, (image - 0.5) / 0.25, atol=1e-5)
  with pytest.raises(ValueError, match='eval_resize=7 is smaller than data.image_size=8'):
    augment.center_view(tf.constant(image), 8, (0.5,) * 3, (0.25,) * 3, resize=7)


def test_mean_and_std_must_match_the_channels():
  image = tf.zeros([8, 8, 3])
  one_line_error('one value per channel', augment.center_view, image, 8, (0.5,), (0.5,))


# --------------------------------------------------------------------------- crop windows


@pytest.mark.parametrize('scale', [(0.05, 0.4), (0.2, 0.4)])
def test_windows_are_sampled_on_the_images_own_size(scale):
  """A 500 x 100 (w x h) image: tried windows have the scale's area and an aspect in [3/4, 4/3]
  in pixels; when no try fits, torchvision's fallback, the centre 133 x 100 (aspect clamped to
  4/3), never the whole (squashed) image; the share of fallbacks is torchvision's (0.2% for
  DINO's local scale, 20% for (0.2, 0.4), whose windows fit in 100 rows only when small)."""
  height, width = 100, 500
  windows = augment.crop_windows(tf.constant([5, 6], tf.int64), 4000, scale, height, width).numpy()
  top, left, crop_height, crop_width = windows.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + crop_height <= height).all() and (left + crop_width <= width).all()
  fallback = (windows == [0, 183, 100, 133]).all(axis=1)
  tried = ~fallback
  # Sides are rounded to whole pixels: area and aspect hold up to half a pixel per side.
  low = (crop_height[tried] - 0.5) * (crop_width[tried] - 0.5) / (height * width)
  high = (crop_height[tried] + 0.5) * (crop_width[tried] + 0.5) / (height * width)
  assert (high >= scale[0]).all() and (low <= scale[1]).all()
  assert ((crop_width[tried] + 0.5) / (crop_height[tried] - 0.5) >= 3 / 4).all()
  assert ((crop_width[tried] - 0.5) / (crop_height[tried] + 0.5) <= 4 / 3).all()
  # The tried windows cover the part of the scale range that fits in 100 rows (<= 0.267).
  areas = crop_height[tried] * crop_width[tried] / (height * width)
  assert areas.min() < scale[0] + 0.02 and areas.max() > 0.24
  rng = np.random.default_rng(1)
  expected = 1 - np.mean([torchvision_fits(height, width, scale, rng) for _ in range(4000)])
  assert abs(fallback.mean() - expected) < 0.03, (fallback.mean(), expected)
  # DINO's global scale: no window of 40% of the image fits in 100 rows at aspect <= 4/3.
  global_windows = augment.crop_windows(tf.constant([5, 7], tf.int64), 50, (0.4, 1.0), height,
                                        width).numpy()
  np.testing.assert_array_equal(global_windows, [[0, 183, 100, 133]] * 50)


@pytest.mark.parametrize(
    'height,width,expected',
    [
        (100, 500, [0, 183, 100, 133]),  # too wide: the centre 4:3 window, full height
        (500, 100, [183, 0, 133, 100]),  # too tall: the centre 3:4 window, full width
        (90, 100, [0, 0, 90, 100]),  # aspect in [3/4, 4/3]: the whole image
    ])
def test_fallback_is_torchvisions_centre_crop(height, width, expected):
  # scale (1, 1) of a 100 x 90 image: every tried window is 95 x 95 or so, taller than 90.
  scale = (1.0, 1.0) if height == 90 else (0.5, 1.0)
  windows = augment.crop_windows(tf.constant([1, 1], tf.int64), 20, scale, height, width).numpy()
  np.testing.assert_array_equal(windows, [expected] * 20)


def transitions(view: np.ndarray, axis: int) -> float:
  """Black/white changes along `axis` of a grey view in [0, 1], the median over the lines (the
  few lines along a cell edge, grey, are left out)."""
  bits = view.mean(axis=-1) > 0.5
  return float(np.median(np.abs(np.diff(bits.astype(int), axis=axis)).sum(axis=axis)))


def test_crops_keep_the_aspect_of_a_checkerboard():
  """Square 10 px cells of a 500 x 100 image stay square up to the window's aspect (within
  [3/4, 4/3]) in every view; the old pipeline squashed the whole image to a square first, which
  makes the cells 5 times taller than wide."""
  image = checkerboard(100, 500, 10)
  seed = tf.constant([3, 9], tf.int64)
  views = augment.random_resized_crops(tf.constant(image), seed, 64, 48, (0.05, 0.4)).numpy()
  windows = augment.crop_windows(seed, 64, (0.05, 0.4), 100, 500).numpy()
  for view, (_, _, crop_height, crop_width) in zip(views, windows):
    across, down = transitions(view, axis=1), transitions(view, axis=0)
    # Cells crossed: crop_width / 10 across and crop_height / 10 down, +-1 at the borders.
    assert abs(across - crop_width / 10) <= 1.5 and abs(down - crop_height / 10) <= 1.5
    assert 0.6 < (across / down) < 1.7
  squashed = tf.image.resize(image / 255, [48, 48], 'bicubic', antialias=True).numpy()
  assert transitions(squashed, axis=1) / transitions(squashed, axis=0) > 4


def test_augmentation_does_not_depend_on_the_batch(tmp_path):
  """augment_views of examples in one batch and one by one (XLA programs of other batch sizes,
  as chunks of another number of processes would be): the same views, bitwise."""
  config = jpeg_config(tmp_path)
  images = [tf.constant(jpeg(smooth_image(40 + 9 * k, 70, seed=k))) for k in range(3)]
  seeds = [tf.constant([7, k], tf.int64) for k in range(3)]
  crops = [
      augment.multi_crop_views(image, seed, config.aug, min_size=16, num_channels=3)
      for image, seed in zip(images, seeds)
  ]
  batch = {key: tf.stack([crop[key] for crop in crops]) for key in crops[0]}
  together = augment.augment_views(batch, tf.stack(seeds), config.aug, config.data.mean,
                                   config.data.std)
  for k in range(3):
    alone = augment.augment_views({
        key: value[None] for key, value in crops[k].items()
    }, seeds[k][None], config.aug, config.data.mean, config.data.std)
    for key in together:
      np.testing.assert_array_equal(together[key][k], alone[key][0])
  single = augment.multi_crop(images[0],
                              seeds[0],
                              config.aug,
                              config.data.mean,
                              config.data.std,
                              min_size=16,
                              num_channels=3)
  other = augment.multi_crop(images[0],
                             tf.constant([7, 5], tf.int64),
                             config.aug,
                             config.data.mean,
                             config.data.std,
                             min_size=16,
                             num_channels=3)
  assert not np.array_equal(other['global_crops'], single['global_crops'])


def test_small_images_are_upscaled_then_cropped_between_pixels():
  """An 8x8 image of a small fixed-size dataset with min_size 16 is upscaled (bicubic, rounded to
  uint8) to 16x16 and cropped by windows anywhere between its pixels, sampled as
  tf.image.crop_and_resize samples a box (bilinear; equal to 1e-3 of a level). An 8x8 image
  upscaled to 224 crops as cheaply (no tables of every window). Any other image, a small one at
  least min_size too, is cropped at its own pixels, as torchvision does."""
  image = smooth_image(8, 8)[..., :1]
  seed = tf.constant([4, 2], tf.int64)

  def crops(min_size, size, small_image=True):
    return augment.random_resized_crops(tf.constant(image),
                                        seed,
                                        6,
                                        size, (0.1, 0.4),
                                        min_size=min_size,
                                        method='bilinear',
                                        small_image=small_image).numpy()

  upscaled = tf.round(
      tf.clip_by_value(tf.image.resize(image, [16, 16], method='bicubic', antialias=True), 0, 255))
  windows = augment.crop_windows(seed, 6, (0.1, 0.4), 16, 16, whole_pixels=False).numpy()
  assert np.any(windows != np.round(windows))  # between pixels
  top, left, height, width = windows.T
  boxes = np.stack([top, left, top + height, left + width], axis=1) / 16
  expected = tf.image.crop_and_resize(upscaled[None], boxes, np.zeros(6, np.int32), [8, 8])
  np.testing.assert_allclose(levels(crops(16, 8)), expected.numpy(), atol=1e-3)
  assert crops(224, 96).shape == (6, 96, 96, 1)
  own_windows = augment.crop_windows(seed, 6, (0.1, 0.4), 8, 8)
  own = augment.window_crops(tf.constant(image), own_windows, 8, 'bilinear')
  np.testing.assert_allclose(crops(16, 8, small_image=False), own, atol=1e-6)
  np.testing.assert_allclose(crops(8, 8), own, atol=1e-6)  # small, but not below min_size


def test_sub_pixel_windows_are_random_resized_crops_draws_unrounded():
  """crop_windows(whole_pixels=False): the same area and aspect-ratio draws as the whole-pixel
  windows, not rounded: inside the image, area a fraction within `scale`, aspect ratio within
  [3/4, 4/3], the window sides the whole-pixel windows' before rounding; a bicubic window of a
  whole line sampled at its own size gives the line back (the grid hits every pixel centre)."""
  seed, scale = tf.constant([7, 3], tf.int64), (0.05, 0.4)
  windows = augment.crop_windows(seed, 2000, scale, 16, 24, whole_pixels=False).numpy()
  top, left, height, width = windows.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + height <= 16 + 1e-4).all() and (left + width <= 24 + 1e-4).all()
  area = height * width / (16 * 24)
  assert area.min() >= scale[0] - 1e-5 and area.max() <= scale[1] + 1e-5
  assert (width / height).min() >= 3 / 4 - 1e-5 and (width / height).max() <= 4 / 3 + 1e-5
  whole = augment.crop_windows(seed, 2000, scale, 16, 24).numpy()
  np.testing.assert_array_equal(whole[:, 2:], np.round(windows[:, 2:]))
  line = np.linspace(0.0, 1.0, 8, dtype=np.float32)**2
  weights = augment._grid_weights([0.0], [8.0], 8, 8, 'bicubic')[0].numpy()  # pylint: disable=protected-access
  np.testing.assert_allclose(weights @ line, line, atol=1e-6)


# --------------------------------------------------------------------------- evaluation view


@pytest.mark.parametrize('height,width', [(375, 500), (500, 333), (257, 301), (300, 200)])
def test_eval_view_of_a_jpeg_is_pils_resize_and_centre_crop(height, width):
  """DINO's Resize(256, bicubic) + CenterCrop(224) by PIL. JPEGs are decoded with the accurate
  IDCT, as PIL decodes them (identical pixels); the views then differ only by the resize: TF's
  float bicubic vs PIL's, which rounds to uint8 between its horizontal and vertical passes.
  Measured on these images: at most 1.4 levels (of 255), 0.31 on average."""
  image = smooth_image(height, width)
  data = jpeg(image)
  decoded = augment.decode(tf.constant(data), 3).numpy()
  np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(data)).convert('RGB')))
  view = augment.center_view(tf.constant(data),
                             224, (0.0,) * 3, (1.0,) * 3,
                             resize=256,
                             num_channels=3).numpy()
  expected = pil_eval_view(Image.open(io.BytesIO(data)).convert('RGB'))
  difference = np.abs(levels(view) - expected)
  assert view.shape == (224, 224, 3)
  assert difference.max() <= 2.0 and difference.mean() <= 0.4, (difference.max(), difference.mean())


def test_eval_view_geometry_is_torchvisions():
  """Which pixels: without resizing (shorter side already 256) the view is exactly the centre
  crop at torchvision's offsets, round((W - 224) / 2) rounding half to even (301: 38); with a
  resize, a one-pixel shift of PIL's view is 100x further from ours than PIL's view itself."""
  for height, width, top, left in ((256, 301, 16, 38), (350, 256, 63, 16), (256, 256, 16, 16)):
    image = RNG.integers(0, 256, (height, width, 3)).astype(np.uint8)
    view = augment.center_view(tf.constant(encode(image, 'PNG')),
                               224, (0.0,) * 3, (1.0,) * 3,
                               resize=256,
                               num_channels=3).numpy()
    np.testing.assert_allclose(levels(view), image[top:top + 224, left:left + 224], atol=1e-3)
  board = checkerboard(333, 500, 7)
  view = levels(
      augment.center_view(tf.constant(board), 224, (0.0,) * 3, (1.0,) * 3, resize=256).numpy())
  expected = pil_eval_view(Image.fromarray(board))
  # Hard edges: PIL clips its intermediate pass where bicubic overshoots (up to 13 levels there,
  # measured), 0.42 on average.
  assert np.abs(view - expected).mean() < 0.6
  for shifted, reference in ((view[1:], expected[:-1]), (view[:, 1:], expected[:, :-1])):
    assert np.abs(shifted - reference).mean() > 30


@pytest.mark.parametrize('height,width', [(375, 500), (500, 333), (7, 9), (1000, 11)])
def test_resized_shape_is_torchvisions(height, width):
  new_height, new_width = augment.resized_shape(height, width, 256)
  short, long = min(height, width), max(height, width)
  expected = (256, int(256 * long / short)) if height <= width else (int(256 * long / short), 256)
  assert (int(new_height), int(new_width)) == expected


def test_eval_resize_default():
  assert augment.eval_resize(224) == 256 and augment.eval_resize(16) == 18
  assert augment.eval_resize(224, 300) == 300
  with pytest.raises(ValueError, match='eval_resize=200 is smaller than data.image_size=224'):
    augment.eval_resize(224, 200)


def test_digits_eval_view_is_the_upscaled_centre(tmp_path):
  """The 8x8 digits with image_size 16: upscaled to 18x18 (eval_resize 0: round(16 * 256 /
  224)), centre 16x16 kept, by constant matmuls equal to tf.image.resize. PIL's upscale clips
  bicubic's overshoot (to -17 beside a stroke) between its passes, which moves the high-contrast
  digits' views by up to 15 levels (measured on these 8), 0.5 on average; one pixel off costs 20
  times that on average."""
  config = config_module('digits').get_config()
  config.data.data_dir = str(tmp_path)
  source = datasets.get_source(config.data)
  assert source.info.image_shape == (8, 8)
  batch = next(pipeline.eval_batches(source, 'test', config, batch_size=8))
  digits = next(source.read('test').batch(8).as_numpy_iterator())['image']
  views = levels(batch['image'][..., 0] * 0.5 + 0.5)  # the digits config's mean and std
  upscaled = np.stack([
      np.asarray(Image.fromarray(digit[..., 0]).resize((18, 18), Image.BICUBIC), np.float32)
      for digit in digits
  ])
  difference = np.abs(views - upscaled[:, 1:17, 1:17])
  assert difference.max() <= 20 and difference.mean() <= 1.0, (difference.max(), difference.mean())
  assert np.abs(views - upscaled[:, :16, 1:17]).mean() > 20 * difference.mean()
  generic = augment.center_view(tf.constant(digits[0]), 16, (0.5,), (0.5,))  # tf.image.resize
  np.testing.assert_allclose(batch['image'][0], generic, atol=1e-5)


# --------------------------------------------------------------------------- partial decoding


def test_partial_decode_crops_equal_full_decode_crops():
  """decode_and_crop_jpeg of each window vs the window of the whole decoded image. 4:4:4 JPEGs:
  identical. 4:2:0 (the usual): chroma upsampling at a window's edges uses other neighbours,
  up to 11 levels on a few edge pixels of half the windows (measured), which the resize to the
  view spreads to at most 12 levels on a pixel and 0.008 on average."""
  image = smooth_image(257, 301)
  windows = augment.crop_windows(tf.constant([8, 1], tf.int64), 40, (0.05, 1.0), 257, 301)
  for subsampling, max_levels, mean_levels in ((0, 0.0, 0.0), (2, 16.0, 0.05)):
    data = tf.constant(jpeg(image, subsampling))
    partial = levels(augment.jpeg_window_crops(data, windows, 96, 3))
    full = levels(augment.window_crops(augment.decode(data, 3), windows, 96))
    difference = np.abs(partial - full)
    assert difference.max() <= max_levels and difference.mean() <= mean_levels
  # The linear evaluation's view of a JPEG decodes only its window, the same view otherwise.
  data = tf.constant(jpeg(image, 0))
  for seed in range(5):
    kwargs = dict(size=64, flip=True, mean=(0.0,) * 3, std=(1.0,) * 3, min_size=16, num_channels=3)
    encoded = augment.linear_train_view(data, tf.constant([seed, 3], tf.int64), **kwargs)
    decoded = augment.linear_train_view(augment.decode(data, 3), tf.constant([seed, 3], tf.int64),
                                        **kwargs)
    np.testing.assert_allclose(encoded, decoded, atol=1e-5)


def test_crop_interpolation_is_the_crops_resize():
  """aug.crop_interpolation chooses the resize of every training crop's window: bicubic
  (DINO's) or bilinear, each equal to window_crops with that method up to uint8 rounding."""
  image = tf.constant(smooth_image(40, 60))
  seed = tf.constant([3, 1], tf.int64)
  windows = augment.crop_windows(augment._group_seeds(seed, 0)[0], 2, (0.4, 1.0), 40, 60)  # pylint: disable=protected-access
  config = config_module('digits').get_config()
  config.aug.update(dict(global_size=16, local_size=8, num_local=2))
  views = {}
  for method in ('bicubic', 'bilinear'):
    config.aug.crop_interpolation = method
    views[method] = augment.multi_crop_views(image, seed, config.aug)['global_crops'].numpy()
    expected = augment.window_crops(image, windows, 16, method).numpy() * 255
    assert np.abs(views[method].astype(np.float32) - expected).max() <= 0.5 + 1e-3
  assert not np.array_equal(views['bicubic'], views['bilinear'])
