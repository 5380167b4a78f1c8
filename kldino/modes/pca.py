"""`--mode=pca`: DINOv2's picture of dense features, a PCA of the teacher's patch tokens.

The tokens are the ViT's patch tokens after the final norm, registers left out; the PCA is fitted
over all patches of all N images together (kldino/evaluate/pca.py). For N images (a split's
first, in evaluation order, or an --inputs array) writes

    OUT/pca.npy     float32 [N, patches, 4], patches row-major over the grid: the first component
                    (> 0 on the foreground), then the foreground's three components as RGB in
                    [0, 1] (0 on the background)
    OUT/index.json  [{"file": the source image (or the dataset's key, or INPUTS[i]), "label"}]
    OUT/<i>.png     the image, its first component, its RGB picture (each patch a square)
    OUT/sheet.png   those rows for all N images
"""
from __future__ import annotations

import os

import numpy as np

from kldino.errors import ConfigError
from kldino.evaluate import pictures
from kldino.evaluate.pca import FOREGROUND_THRESHOLD, MIN_PATCHES, patch_pca
from kldino.models import forward
from kldino.modes.features import eval_pixels, teacher_outputs, vit_images, write_array_and_index


def write_pca(images: np.ndarray, pca: np.ndarray, patch_grid: tuple[int, int], index: list[dict],
              output: str) -> dict:
  """pca.npy, index.json, one PNG per image and sheet.png under `output`; what was written."""
  written = write_array_and_index(output, 'pca', pca, index)
  rows = [pictures.pca_row(image, image_pca, patch_grid) for image, image_pca in zip(images, pca)]
  for i, row in enumerate(rows):
    pictures.grid([row]).save(os.path.join(output, f'{i}.png'))
  pictures.grid(rows).save(os.path.join(output, 'sheet.png'))
  return {
      **written, 'sheet': os.path.join(output, 'sheet.png'),
      'num_images': int(len(images)),
      'patches': int(pca.shape[1]),
      'foreground_fraction': float(np.mean(pca[..., 0] > FOREGROUND_THRESHOLD))
  }


def run(config, workdir: str, *, step: int | None, output: str, split: str | None, num_images: int,
        inputs: str | None) -> dict:
  """The PCA of the teacher's patch tokens of --inputs or of the first --num_images images of
  --split."""
  opened, images, index = vit_images(config,
                                     workdir,
                                     mode='pca',
                                     shows="a ViT's patch tokens",
                                     split=split,
                                     num_images=num_images,
                                     inputs=inputs)
  pixels, patch_grid = eval_pixels(config, images)
  patches = len(images) * patch_grid[0] * patch_grid[1]
  if patches < MIN_PATCHES:
    raise ConfigError(f'--mode=pca needs at least {MIN_PATCHES} patches in all, got {patches} '
                      f'({len(images)} images of {patch_grid[0]}x{patch_grid[1]}): pass more '
                      'images (--num_images) or larger ones')
  tokens, step = teacher_outputs(opened, step, images, forward.patch_tokens)
  written = write_pca(pixels, patch_pca(tokens, patch_grid), patch_grid, index, output)
  return {**written, 'step': step}
