"""Pictures of what the model sees and where it looks, as uint8 arrays and PIL images: views
de-normalised, grids of views, and DINO's attention maps (visualize_attention.py) with their 60 %
mass threshold, and DINOv2's PCA of the patch tokens (kldino/evaluate/pca.py). --mode=preview,
--mode=attention, --mode=pca and TensorBoard draw with them.

An attention picture has two rows: the image, each head's map, the heads' mean; then the image
kept where each map's mass threshold keeps it. A map is drawn per patch (nearest, each patch a
square of the image), its values scaled from its own minimum to its maximum. A PCA picture is one
row: the image, its first component (as a map), its RGB components (background black).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

_GAP = 4  # pixels between the grid's cells
_MIN_CELL = 96  # small views (the 16-pixel digits) are enlarged, nearest, to cells of at least this

KEEP_MASS = 0.6  # DINO's visualize_attention.py --threshold
_DIMMED = 0.2  # brightness of the image where a thresholded map drops it
# A black -> red -> yellow -> white ramp for the maps (values in [0, 1]).
_RAMP = np.array([[0, 0, 0], [200, 30, 0], [255, 200, 0], [255, 255, 255]], np.float32)


def to_uint8(normalised: np.ndarray, mean, std) -> np.ndarray:
  """A normalised float view [H, W, C] back to uint8 pixels (what the augmentation produced)."""
  pixels = normalised * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)


def to_image(pixels: np.ndarray) -> Image.Image:
  return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def grid(rows: list[list[np.ndarray]]) -> Image.Image:
  """Rows of uint8 views of any sizes, each cell as large as the largest view, top-left aligned;
  every view enlarged by the same integer factor when the largest is under _MIN_CELL pixels."""
  largest = max(max(view.shape[0], view.shape[1]) for row in rows for view in row)
  zoom = -(-_MIN_CELL // largest)
  rows = [[np.repeat(np.repeat(view, zoom, axis=0), zoom, axis=1) for view in row] for row in rows]
  cell = largest * zoom
  width = max(len(row) for row in rows) * (cell + _GAP) + _GAP
  canvas = Image.new('RGB', (width, len(rows) * (cell + _GAP) + _GAP), 'white')
  for row_index, row in enumerate(rows):
    for column, view in enumerate(row):
      canvas.paste(
          to_image(view).convert('RGB'),
          (_GAP + column * (cell + _GAP), _GAP + row_index * (cell + _GAP)))
  return canvas


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
  """A [h, w, ...] map to the image's [height, width, ...], each patch a block."""
  rows, columns = patch_map.shape[:2]
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


def pca_picture(image: np.ndarray, pca: np.ndarray, patch_grid: tuple[int, int]):
  """The PNG of one image (uint8 [H, W, C]) and its PCA [patches, 4] (kldino/evaluate/pca.py's
  layout), as a PIL image."""
  return grid([pca_row(image, pca, patch_grid)])


def pca_row(image: np.ndarray, pca: np.ndarray, patch_grid: tuple[int, int]) -> list[np.ndarray]:
  """The cells of one image's PCA picture (module docstring), uint8."""
  height, width = image.shape[:2]
  colours = np.round(pca[:, 1:4].reshape(*patch_grid, 3) * 255).astype(np.uint8)
  return [
      _rgb(image),
      _heat(pca[:, 0].reshape(patch_grid), height, width),
      _enlarge(colours, height, width)
  ]
