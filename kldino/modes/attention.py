"""`--mode=attention`: where the teacher looks, as DINO's visualize_attention.py shows it.

For N images (a split's first, in evaluation order, or an --inputs array) writes

    OUT/attention.npy  float32 [N, heads, patches]: the last block's softmax attention from the
                       CLS token to every patch (row-major over the patch grid), per head
    OUT/index.json     [{"file": the source image (or the dataset's key, or INPUTS[i]), "label"}]
    OUT/<i>.png        two rows: the image, each head's map, the heads' mean; then the image kept
                       where each map's 60 % mass threshold keeps it (kldino/evaluate/pictures.py)
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from kldino.data import pipeline
from kldino.errors import ConfigError
from kldino.evaluate.pictures import picture, to_uint8
from kldino.models import forward
from kldino.models.vit import VIT_SIZES
from kldino.modes.features import batched, load_inputs
from kldino.run import Run


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


def _images(opened: Run, split: str | None, num_images: int, inputs: str | None):
  """The images to look at, normalised, as the backbone takes them, and their index entries."""
  config = opened.config
  if inputs:
    images = load_inputs(inputs, config, opened.in_channels)
    return images, [{
        'file': f'{os.path.abspath(inputs)}[{i}]',
        'label': None
    } for i in range(len(images))]
  split = split or config.data.eval_split
  try:
    opened.source.num_examples(split)
  except ValueError as error:
    raise ConfigError(f'--split={split}: {error}') from None
  views = list(pipeline.preview_views(opened.source, split, config, num_images, crops=False))
  if not views:
    raise ConfigError(f"--split={split} has no image that decodes: choose another split")
  return (np.stack([view['eval'] for view in views]), [{
      'file': view['file'],
      'label': int(view['label'])
  } for view in views])


def run(config, workdir: str, *, step: int | None, output: str, split: str | None, num_images: int,
        inputs: str | None) -> dict:
  """The teacher's CLS attention maps of --inputs or of the first --num_images images of
  --split."""
  if config.model.name not in VIT_SIZES:
    raise ConfigError(f'--mode=attention shows a ViT\'s self-attention: model.name='
                      f'{config.model.name} has none; use it on a run of a vit_* model')
  if inputs and split:
    raise ConfigError('--mode=attention takes --inputs=X.npy or --split=S, not both')
  if jax.process_count() > 1:
    raise ConfigError('--mode=attention runs on one process: run it without jax.distributed')
  opened = Run(config, workdir)
  images, index = _images(opened, split, num_images, inputs)
  teacher, step = opened.restore_teacher(step)
  maps = batched(opened, teacher, images,
                 lambda params, batch: forward.cls_attention(opened.graphdef, params, batch))
  side = images.shape[1] // config.model.patch_size
  pixels = np.stack([to_uint8(image, config.data.mean, config.data.std) for image in images])
  written = write_attention(pixels, maps, (side, side), index, output)
  return {**written, 'step': step}
