"""iBOT's block-wise patch masks, drawn as DINOv2 draws them (dinov2/data/masking.py and the
batch's share and ratios of dinov2/data/collate.py), as numpy functions of a random generator.

A mask is built from rectangular blocks of at least `min_block` patches with a log-uniform aspect
ratio in [min_aspect, 1 / min_aspect], each adding at most what is left of the target (and at
most `max_block` patches); a block is drawn up to ten times before the mask is left smaller than
its target. Of a batch's `count` masks (one per global crop), int(count * probability) are drawn
with targets spread over `ratio_min_max`, each in its own slice of it, and the rest are empty;
the order is shuffled.
"""
from __future__ import annotations

import math

import numpy as np

_TRIES = 10


def _add_block(rng: np.random.Generator, mask: np.ndarray, budget: int, min_block: int,
               log_aspect: tuple[float, float]) -> int:
  """Marks one block of at most `budget` new patches in `mask`; how many it marked (0: none)."""
  height, width = mask.shape
  for _ in range(_TRIES):
    area = min_block + (budget - min_block) * rng.random()  # budget may be below min_block
    aspect = math.exp(rng.uniform(*log_aspect))
    block_height = int(round(math.sqrt(area * aspect)))
    block_width = int(round(math.sqrt(area / aspect)))
    if block_height >= height or block_width >= width:
      continue
    top = int(rng.integers(0, height - block_height + 1))
    left = int(rng.integers(0, width - block_width + 1))
    window = mask[top:top + block_height, left:left + block_width]
    added = block_height * block_width - int(window.sum())
    if 0 < added <= budget:
      window[...] = True
      return added
  return 0


def block_mask(rng: np.random.Generator,
               grid: tuple[int, int],
               target: int,
               *,
               max_block: int,
               min_block: int = 4,
               min_aspect: float = 0.3) -> np.ndarray:
  """bool [height, width]: blocks until `target` patches are masked or no block fits."""
  mask = np.zeros(grid, bool)
  log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
  masked = 0
  while masked < target:
    added = _add_block(rng, mask, min(target - masked, max_block), min_block, log_aspect)
    if not added:
      break
    masked += added
  return mask


def _ratio_bounds(count: int, probability: float, ratio_min_max: tuple[float, float]) -> np.ndarray:
  return np.linspace(*ratio_min_max, int(count * probability) + 1)


def batch_masks(rng: np.random.Generator, count: int, grid: tuple[int, int], *, probability: float,
                ratio_min_max: tuple[float, float]) -> np.ndarray:
  """bool [count, height * width]: the masks of `count` global crops (module docstring); blocks
  of at most half the patches, as DINOv2's training sets them."""
  num_patches = grid[0] * grid[1]
  bounds = _ratio_bounds(count, probability, ratio_min_max)
  masks = [
      block_mask(rng,
                 grid,
                 int(num_patches * rng.uniform(low, high)),
                 max_block=int(0.5 * num_patches)).reshape(-1)
      for low, high in zip(bounds[:-1], bounds[1:])
  ]
  masks += [np.zeros(num_patches, bool)] * (count - len(masks))
  return np.stack([masks[index] for index in rng.permutation(count)])


def max_masked(count: int, num_patches: int, *, probability: float,
               ratio_min_max: tuple[float, float]) -> int:
  """An upper bound of the masked patches of `batch_masks(count, ...)`, from the shapes alone
  (DINOv2's `upperbound`): a static size for the masked patches of a batch."""
  bounds = _ratio_bounds(count, probability, ratio_min_max)
  return int(sum(int(num_patches * high) for high in bounds[1:]))


def used(objective_config) -> bool:
  """Whether the objective has iBOT's masked-patch term, which the masks are for."""
  return objective_config.ibot.loss_weight > 0


def _grid(config) -> tuple[int, int]:
  side = config.aug.global_size // config.model.patch_size
  return side, side


def group_size(config, device_count: int) -> int:
  """Images per mask group: objective.ibot.mask_group_size, or (0) one device's share of the
  batch, as DINOv2 masks each GPU's batch. A group's masks keep to its own bound, so that each
  device gathers its masked patches to a static size."""
  return config.objective.ibot.mask_group_size or config.batch_size // device_count


def training_masks(config, *, epoch: int, step: int, first_row: int, rows: int,
                   group: int) -> np.ndarray:
  """bool [rows, 2, h * w]: the masks of the global batch's rows [first_row, first_row + rows) of
  a training step (one per global crop), drawn group by group, each group's a pure function of
  (seed, epoch, step in epoch, group): the same on any number of processes."""
  ibot = config.objective.ibot
  masks = []
  for first in range(first_row, first_row + rows, group):
    rng = np.random.default_rng([config.seed, epoch, step, first // group])
    masks.append(
        batch_masks(rng,
                    2 * group,
                    _grid(config),
                    probability=ibot.mask_sample_probability,
                    ratio_min_max=tuple(ibot.mask_ratio_min_max)).reshape(group, 2, -1))
  return np.concatenate(masks)


def group_bound(config, group: int) -> int:
  """The most patches one group's masks can mask (masking.max_masked of its 2 * group crops)."""
  ibot, (height, width) = config.objective.ibot, _grid(config)
  return max_masked(2 * group,
                    height * width,
                    probability=ibot.mask_sample_probability,
                    ratio_min_max=tuple(ibot.mask_ratio_min_max))
