"""kldino/data/masking.py draws iBOT's masks as DINOv2 does: the same statistics of mask sizes and
shapes as a transcription of DINOv2's MaskingGenerator and collate (below, written from
dinov2/data/masking.py and dinov2/data/collate.py, with Python's random as there), not the same
bits; the static upper bound holds for every batch."""
import math
import random

import numpy as np
import pytest

from kldino.data import masking

GRID = (14, 14)  # 224 / 16
NUM_PATCHES = GRID[0] * GRID[1]


class DinoV2MaskingGenerator:
  """dinov2/data/masking.py:MaskingGenerator as DINOv2's training builds it."""

  def __init__(self, grid, max_num_patches, min_num_patches=4, min_aspect=0.3):
    self.height, self.width = grid
    self.min_num_patches, self.max_num_patches = min_num_patches, max_num_patches
    self.log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))

  def _mask(self, mask, max_mask_patches):
    delta = 0
    for _ in range(10):
      target_area = random.uniform(self.min_num_patches, max_mask_patches)
      aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
      h = int(round(math.sqrt(target_area * aspect_ratio)))
      w = int(round(math.sqrt(target_area / aspect_ratio)))
      if w < self.width and h < self.height:
        top, left = random.randint(0, self.height - h), random.randint(0, self.width - w)
        num_masked = mask[top:top + h, left:left + w].sum()
        if 0 < h * w - num_masked <= max_mask_patches:
          for i in range(top, top + h):
            for j in range(left, left + w):
              if mask[i, j] == 0:
                mask[i, j] = 1
                delta += 1
        if delta > 0:
          break
    return delta

  def __call__(self, num_masking_patches=0):
    mask = np.zeros((self.height, self.width), dtype=bool)
    mask_count = 0
    while mask_count < num_masking_patches:
      max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
      delta = self._mask(mask, max_mask_patches)
      if delta == 0:
        break
      mask_count += delta
    return mask


def dinov2_batch_masks(count, generator, probability=0.5, ratio_min_max=(0.1, 0.5)):
  """The masks of dinov2/data/collate.py:collate_data_and_cast, and its upperbound."""
  n_masked = int(count * probability)
  probs = np.linspace(*ratio_min_max, n_masked + 1)
  masks, upperbound = [], 0
  for i in range(n_masked):
    masks.append(generator(int(NUM_PATCHES * random.uniform(probs[i], probs[i + 1]))))
    upperbound += int(NUM_PATCHES * probs[i + 1])
  masks += [generator(0) for _ in range(n_masked, count)]
  random.shuffle(masks)
  return np.stack(masks).reshape(count, -1), upperbound


def _shape_statistics(masks):
  """Per mask: masked patches, rows and columns touched."""
  masks = masks.reshape(-1, *GRID)
  return np.stack([masks.sum((1, 2)), masks.any(2).sum(1), masks.any(1).sum(1)], axis=1)


@pytest.mark.parametrize('target', [10, 40, 98])
def test_single_masks_have_dinov2s_sizes_and_shapes(target):
  random.seed(0)
  reference = DinoV2MaskingGenerator(GRID, max_num_patches=NUM_PATCHES // 2)
  expected = _shape_statistics(np.stack([reference(target) for _ in range(3000)]))
  rng = np.random.default_rng(0)
  got = _shape_statistics(
      np.stack(
          [masking.block_mask(rng, GRID, target, max_block=NUM_PATCHES // 2) for _ in range(3000)]))
  assert (got[:, 0] <= target).all()
  # Means within 4 standard errors of the difference of two 3000-draw means.
  standard_error = np.sqrt((expected.var(0) + got.var(0)) / 3000) + 1e-9
  assert (np.abs(got.mean(0) - expected.mean(0))
          < 4 * standard_error).all(), (got.mean(0), expected.mean(0))
  assert got.std(0) == pytest.approx(expected.std(0), rel=0.1, abs=0.2)


def test_batches_have_dinov2s_share_of_masked_crops_and_ratios():
  random.seed(1)
  reference = DinoV2MaskingGenerator(GRID, max_num_patches=NUM_PATCHES // 2)
  rng = np.random.default_rng(1)
  count = 64  # global crops of a batch of 32 images
  bound = masking.max_masked(count, NUM_PATCHES, probability=0.5, ratio_min_max=(0.1, 0.5))
  expected_totals, totals = [], []
  for _ in range(200):
    masks, upperbound = dinov2_batch_masks(count, reference)
    assert upperbound == bound
    expected_totals.append(masks.sum())
    masks = masking.batch_masks(rng, count, GRID, probability=0.5, ratio_min_max=(0.1, 0.5))
    assert masks.shape == (count, NUM_PATCHES) and masks.dtype == bool
    assert masks.sum() <= bound and (masks.any(1).sum() == count // 2)
    totals.append(masks.sum())
  assert np.mean(totals) == pytest.approx(np.mean(expected_totals), rel=0.02)
  assert np.std(totals) == pytest.approx(np.std(expected_totals), rel=0.25)
