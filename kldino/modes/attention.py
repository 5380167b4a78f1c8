"""`--mode=attention`: where the teacher looks, as DINO's visualize_attention.py shows it.

For N images (a split's first, in evaluation order, or an --inputs array) writes

    OUT/attention.npy  float32 [N, heads, patches]: the last block's softmax attention from the
                       CLS token to every patch (row-major over the patch grid), per head
    OUT/index.json     [{"file": the source image (or the dataset's key, or INPUTS[i]), "label"}]
    OUT/<i>.png        two rows: the image, each head's map, the heads' mean; then the image kept
                       where each map's 60 % mass threshold keeps it (kldino/evaluate/pictures.py)
"""
from __future__ import annotations

import os

import numpy as np

from kldino.evaluate.pictures import picture
from kldino.models import forward
from kldino.modes.features import eval_pixels, teacher_outputs, vit_images, write_array_and_index


def write_attention(images: np.ndarray, attention: np.ndarray, patch_grid: tuple[int, int],
                    index: list[dict], output: str) -> dict:
  """attention.npy, index.json and one PNG per image under `output`; returns what was written."""
  written = write_array_and_index(output, 'attention', attention, index)
  for i, (image, image_attention) in enumerate(zip(images, attention)):
    picture(image, image_attention, patch_grid).save(os.path.join(output, f'{i}.png'))
  return {
      **written, 'num_images': int(len(images)),
      'heads': int(attention.shape[1]),
      'patches': int(attention.shape[2])
  }


def run(config, workdir: str, *, step: int | None, output: str, split: str | None, num_images: int,
        inputs: str | None) -> dict:
  """The teacher's CLS attention maps of --inputs or of the first --num_images images of
  --split."""
  opened, images, index = vit_images(config,
                                     workdir,
                                     mode='attention',
                                     shows="a ViT's self-attention",
                                     split=split,
                                     num_images=num_images,
                                     inputs=inputs)
  maps, step = teacher_outputs(opened, step, images, forward.cls_attention)
  pixels, patch_grid = eval_pixels(config, images)
  written = write_attention(pixels, maps, patch_grid, index, output)
  return {**written, 'step': step}
