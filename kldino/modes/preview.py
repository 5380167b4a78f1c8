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

import jax

from kldino.data import pipeline
from kldino.errors import ConfigError
from kldino.evaluate.pictures import grid, to_image, to_uint8
from kldino.run import Run


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


def run(config, workdir: str | None, *, output: str, split: str | None, num_images: int) -> dict:
  del workdir  # the preview reads the config's data only
  opened = Run(config, output)
  split = split or config.data.eval_split
  try:
    opened.source.num_examples(split)
  except ValueError as error:
    raise ConfigError(f'--split={split}: {error}') from None
  if jax.process_index() != 0:
    return {}
  return write_preview(opened.source, config, split, num_images, output)
