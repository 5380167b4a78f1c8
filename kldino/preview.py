"""`--mode=preview`: see the input as the model sees it.

For the first N images of a split, in the order of the evaluation pipeline, writes

    OUT/index.json         [{"file": the source image's path (or the dataset's key), "label": int}]
    OUT/<i>_eval.png       the evaluation view, as uint8 before normalisation
    OUT/<i>_global_<j>.png the training crops of epoch 0 after augmentation, de-normalised
    OUT/<i>_local_<j>.png
    OUT/preview.png        one grid: a row per image (evaluation view, global crops, local crops)
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from kldino.data import pipeline

_GAP = 4  # pixels between the grid's cells
_MIN_CELL = 96  # small views (the 16-pixel digits) are enlarged, nearest, to cells of at least this


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


def write_preview(source, config, split: str, num_images: int, output: str) -> dict:
  os.makedirs(output, exist_ok=True)
  mean, std = config.data.mean, config.data.std
  index, rows = [], []
  for i, views in enumerate(pipeline.preview_views(source, split, config, num_images)):
    row = [to_uint8(views['eval'], mean, std)]
    to_image(row[0]).save(os.path.join(output, f'{i}_eval.png'))
    for kind in ('global', 'local'):
      for j, crop in enumerate(views[f'{kind}_crops']):
        pixels = to_uint8(crop, mean, std)
        to_image(pixels).save(os.path.join(output, f'{i}_{kind}_{j}.png'))
        row.append(pixels)
    rows.append(row)
    index.append({'file': views['file'], 'label': int(views['label'])})
  if not rows:
    raise ValueError(f"split '{split}' has no images to preview")
  with open(os.path.join(output, 'index.json'), 'w') as f:
    json.dump(index, f, indent=1)
  grid(rows).save(os.path.join(output, 'preview.png'))
  return {
      'preview': os.path.join(output, 'preview.png'),
      'index': os.path.join(output, 'index.json'),
      'num_images': len(rows),
      'split': split
  }
