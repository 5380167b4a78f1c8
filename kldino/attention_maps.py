"""`--mode=attention`: where the teacher looks, as DINO's visualize_attention.py shows it.

For N images (a split's first, in evaluation order, or an --inputs array) writes

    OUT/attention.npy  float32 [N, heads, patches]: the last block's softmax attention from the
                       CLS token to every patch (row-major over the patch grid), per head
    OUT/index.json     [{"file": the source image (or the dataset's key, or INPUTS[i]), "label"}]
    OUT/<i>.png        two rows: the image, each head's map, the heads' mean; then the image kept
                       where each map's 60 % mass threshold keeps it (mass_threshold)

A map is drawn per patch (nearest, each patch a square of the image), its values scaled from
its own minimum to its maximum.
"""
from __future__ import annotations

import json
import os

import numpy as np

from kldino.preview import grid

KEEP_MASS = 0.6  # DINO's visualize_attention.py --threshold
_DIMMED = 0.2  # brightness of the image where a thresholded map drops it
# A black -> red -> yellow -> white ramp for the maps (values in [0, 1]).
_RAMP = np.array([[0, 0, 0], [200, 30, 0], [255, 200, 0], [255, 255, 255]], np.float32)


def mass_threshold(attention: np.ndarray, keep: float = KEEP_MASS) -> np.ndarray:
  """bool, attention's shape: per row (last axis), the largest weights whose sum first reaches
  `keep` of the row's mass: a weight is kept when the weights above it hold less than `keep`."""
  order = np.argsort(-attention, axis=-1)
  ranked = np.take_along_axis(attention, order, axis=-1)
  ranked = ranked / ranked.sum(axis=-1, keepdims=True)
  kept_ranked = np.cumsum(ranked, axis=-1) - ranked < keep
  kept = np.empty_like(kept_ranked)
  np.put_along_axis(kept, order, kept_ranked, axis=-1)
  return kept


def _enlarge(patch_map: np.ndarray, height: int, width: int) -> np.ndarray:
  """A [h, w] map to the image's [height, width], each patch a block."""
  rows, columns = patch_map.shape
  return np.repeat(np.repeat(patch_map, height // rows, axis=0), width // columns, axis=1)


def _heat(patch_map: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 RGB [height, width, 3] of a map scaled to [0, 1] by its own range."""
  span = patch_map.max() - patch_map.min()
  unit = (patch_map - patch_map.min()) / span if span > 0 else np.zeros_like(patch_map)
  position = _enlarge(unit, height, width) * (len(_RAMP) - 1)
  low = np.minimum(np.floor(position).astype(int), len(_RAMP) - 2)
  fraction = (position - low)[..., None]
  return np.round(_RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction).astype(np.uint8)


def _rgb(image: np.ndarray) -> np.ndarray:
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def picture(image: np.ndarray, attention: np.ndarray, patch_grid: tuple[int, int]):
  """The PNG of one image (uint8 [H, W, C]) and its attention [heads, patches] (module
  docstring), as a PIL image."""
  height, width = image.shape[:2]
  maps = np.concatenate([attention, attention.mean(axis=0, keepdims=True)])
  maps = maps.reshape(len(maps), *patch_grid)
  kept = mass_threshold(maps.reshape(len(maps), -1)).reshape(maps.shape)
  image = _rgb(image)
  top = [image] + [_heat(patch_map, height, width) for patch_map in maps]
  dimmed = lambda mask: np.round(image * np.where(_enlarge(mask, height, width), 1.0, _DIMMED)[
      ..., None]).astype(np.uint8)
  bottom = [image] + [dimmed(mask) for mask in kept]
  return grid([top, bottom])


def write_attention(images: np.ndarray, attention: np.ndarray, patch_grid: tuple[int, int],
                    index: list[dict], output: str) -> dict:
  """attention.npy, index.json and one PNG per image under `output`; returns what was written."""
  os.makedirs(output, exist_ok=True)
  np.save(os.path.join(output, 'attention.npy'), attention.astype(np.float32))
  with open(os.path.join(output, 'index.json'), 'w') as f:
    json.dump(index, f, indent=1)
  for i, (image, image_attention) in enumerate(zip(images, attention)):
    picture(image, image_attention, patch_grid).save(os.path.join(output, f'{i}.png'))
  return {
      'attention': os.path.join(output, 'attention.npy'),
      'index': os.path.join(output, 'index.json'),
      'num_images': int(len(images)),
      'heads': int(attention.shape[1]),
      'patches': int(attention.shape[2])
  }
