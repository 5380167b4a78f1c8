"""`--mode=features`: the teacher backbone's features (eval.n_last_blocks, eval.avgpool_patchtokens)
of a checkpoint, with their labels, for a split or for a float32 NHWC .npy of already-preprocessed
images (--inputs: no dataset is read) -> .npy files. Also what the modes that draw a ViT teacher's
view of images (attention, pca) share: their images, the teacher's outputs, the index they write."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from kldino.core import sharding
from kldino.data import pipeline
from kldino.errors import ConfigError
from kldino.evaluate import bank as bank_lib
from kldino.evaluate.evaluators import SplitBanks
from kldino.evaluate.pictures import to_uint8
from kldino.models import forward
from kldino.models import validate_model_config
from kldino.models.vit import VIT_SIZES
from kldino.run import Run


def load_inputs(path: str, config, in_channels: int) -> np.ndarray:
  """The images of --inputs: float32 [N, H, W, C], square, a whole number of patches."""
  if not os.path.isfile(path):
    raise ConfigError(f'--inputs={path} does not exist: pass a .npy of float32 NHWC images')
  try:
    images = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as error:
    raise ConfigError(f'--inputs={path} is not a .npy file of numbers ({str(error)[:80]}): '
                      'save the images with numpy.save') from None
  if (not isinstance(images, np.ndarray) or images.dtype != np.float32 or images.ndim != 4 or
      images.shape[-1] != in_channels or not images.shape[0]):
    raise ConfigError(f'--inputs={path} holds {getattr(images, "dtype", "")} '
                      f'{getattr(images, "shape", type(images).__name__)}: it must be float32 '
                      f'[N, H, W, {in_channels}], already normalised (no resizing is done)')
  height, width = images.shape[1:3]
  try:
    validate_model_config(config.model, image_sizes=(height, width))
    takes = height == width
  except ValueError:
    takes = False
  if not takes:
    size = config.aug.global_size
    raise ConfigError(f'--inputs={path} holds {height}x{width} images: the backbone takes square '
                      'images of a whole number of patches (model.patch_size); resize or crop '
                      f'them, e.g. to the {size}x{size} it trained on')
  return images


def batched(opened: Run, teacher, images: np.ndarray, forward_fn) -> np.ndarray:
  """forward_fn(params, batch) of host images [N, H, W, C], in padded batches sharded over the
  mesh: eval.batch_size at most, and no larger than the images rounded up to the devices."""
  devices = opened.mesh.devices.size
  batch_size = min(opened.config.eval.batch_size, -(-images.shape[0] // devices) * devices)
  features_fn = jax.jit(forward_fn,
                        in_shardings=(opened.param_shardings, sharding.batch_sharding(opened.mesh)),
                        out_shardings=sharding.replicated(opened.mesh))
  outputs = []
  for start in range(0, images.shape[0], batch_size):
    chunk = images[start:start + batch_size]
    padded = np.concatenate(
        [chunk, np.zeros((batch_size - chunk.shape[0], *chunk.shape[1:]), chunk.dtype)])
    outputs.append(np.asarray(features_fn(teacher, jnp.asarray(padded)))[:chunk.shape[0]])
  return np.concatenate(outputs)


def _eval_images(opened: Run, split: str | None, num_images: int, inputs: str | None):
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


def vit_images(config, workdir: str, *, mode: str, shows: str, split: str | None, num_images: int,
               inputs: str | None) -> tuple[Run, np.ndarray, list[dict]]:
  """(the Run, the images, their index entries) of a mode that draws what a ViT teacher makes of
  --inputs or of a split's first --num_images evaluation views; `shows` (what it draws, which
  other backbones lack) words its refusal of a model that is no ViT."""
  if config.model.name not in VIT_SIZES:
    raise ConfigError(f'--mode={mode} shows {shows}: model.name={config.model.name} has none; '
                      'use it on a run of a vit_* model')
  if inputs and split:
    raise ConfigError(f'--mode={mode} takes --inputs=X.npy or --split=S, not both')
  if jax.process_count() > 1:
    raise ConfigError(f'--mode={mode} runs on one process: run it without jax.distributed')
  opened = Run(config, workdir)
  return (opened, *_eval_images(opened, split, num_images, inputs))


def teacher_outputs(opened: Run, step: int | None, images: np.ndarray, forward_fn):
  """(forward_fn(graphdef, params, images) of the checkpoint's teacher, as numpy, its step)."""
  teacher, step = opened.restore_teacher(step)
  return batched(opened, teacher, images,
                 lambda params, batch: forward_fn(opened.graphdef, params, batch)), step


def eval_pixels(config, images: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
  """(uint8 pixels of normalised images, their patch grid)."""
  side = images.shape[1] // config.model.patch_size
  pixels = np.stack([to_uint8(image, config.data.mean, config.data.std) for image in images])
  return pixels, (side, side)


def write_array_and_index(output: str, name: str, array: np.ndarray, index: list[dict]) -> dict:
  """OUTPUT/NAME.npy (float32) and OUTPUT/index.json; their paths."""
  os.makedirs(output, exist_ok=True)
  np.save(os.path.join(output, f'{name}.npy'), array.astype(np.float32))
  with open(os.path.join(output, 'index.json'), 'w') as f:
    json.dump(index, f, indent=1)
  return {name: os.path.join(output, f'{name}.npy'), 'index': os.path.join(output, 'index.json')}


def _split_features(opened: Run, teacher, split: str) -> tuple[np.ndarray, np.ndarray]:
  opened.source.num_examples(split)  # an unknown split fails here, with the splits it has
  banks = SplitBanks(opened, feature_options=opened.feature_options, cluster_stats=False)
  banks.start(teacher)
  return bank_lib.host_features(banks.bank(teacher, split))


def _labels_path(output: str) -> str:
  return (output[:-len('.npy')] if output.endswith('.npy') else output) + '_labels.npy'


def run(config, workdir: str, *, step: int | None, output: str | None, split: str | None,
        inputs: str | None) -> dict:
  """Features (and, for a split, labels) to .npy files; returns what was written."""
  if jax.process_count() > 1 and inputs:
    raise ConfigError('--inputs runs on one process: run --mode=features without '
                      'jax.distributed (one host)')
  opened = Run(config, workdir)
  if inputs:
    images = load_inputs(inputs, config, opened.in_channels)
  else:
    opened.source  # pylint: disable=pointless-statement  # a bad dataset fails before any reading
  teacher, step = opened.restore_teacher(step)
  if inputs:
    options = opened.feature_options
    features, labels = batched(
        opened, teacher, images, lambda params, batch: forward.backbone_features(
            opened.graphdef, params, batch, **options)), None
    output = output or os.path.join(workdir, f'features_inputs_step{step}.npy')
  else:
    split = split or config.data.eval_split
    try:
      features, labels = _split_features(opened, teacher, split)
    except ValueError as error:
      raise ConfigError(f'--split={split}: {error}') from None
    output = output or os.path.join(workdir, f'features_{split}_step{step}.npy')
  written = {
      'features': output,
      'step': step,
      'num_examples': int(features.shape[0]),
      'feature_dim': int(features.shape[1])
  }
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    np.save(output, features)
    if labels is not None:
      written['labels'] = _labels_path(output)
      np.save(written['labels'], labels)
  return written
