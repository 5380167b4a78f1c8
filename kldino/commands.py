"""What `python -m kldino.main --mode=...` runs besides training: each reads a checkpoint of the
workdir (or, for import, writes the first one) and writes its result to a file.

    eval      the teacher backbone of the latest (or --step) checkpoint: k-NN + linear probe on
              any dataset kldino reads -> eval JSON
    features  its features (CLS after the final norm) and labels of a split, or of a float32 NHWC
              .npy of already-preprocessed images -> .npy
    export    its parameters -> .npz (format in kldino/export.py)
    import    an official DINO PyTorch ViT checkpoint -> a step-0 checkpoint of this workdir
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from kldino import checkpoint as checkpoint_lib
from kldino import convert_dino
from kldino import export as export_lib
from kldino import forward
from kldino import sharding
from kldino.config_checks import ConfigError
from kldino.evaluate import protocol
from kldino.train import Trainer, write_eval_json


def evaluate_checkpoint(config, workdir: str, *, step: int | None, output: str | None) -> dict:
  trainer = Trainer(config, workdir)
  teacher, step = trainer.restore_teacher(step)
  results = trainer.evaluate(teacher, step)
  write_eval_json(results, output or os.path.join(workdir, 'eval.json'))
  return results


def _array_features(trainer: Trainer, teacher, images: np.ndarray) -> np.ndarray:
  """Backbone features of host images [N, H, W, C], in padded batches sharded over the mesh."""
  batch_size = trainer.config.eval.batch_size
  features_fn = jax.jit(
      lambda params, batch: forward.backbone_features(trainer.graphdef, params, batch),
      in_shardings=(trainer.state_shardings.teacher, sharding.batch_sharding(trainer.mesh)),
      out_shardings=sharding.replicated(trainer.mesh))
  outputs = []
  for start in range(0, images.shape[0], batch_size):
    chunk = images[start:start + batch_size]
    padded = np.concatenate(
        [chunk, np.zeros((batch_size - chunk.shape[0], *chunk.shape[1:]), chunk.dtype)])
    outputs.append(np.asarray(features_fn(teacher, jnp.asarray(padded)))[:chunk.shape[0]])
  return np.concatenate(outputs)


def _load_inputs(path: str, in_channels: int) -> np.ndarray:
  if not os.path.isfile(path):
    raise ConfigError(f'--inputs={path} does not exist: pass a .npy of float32 NHWC images')
  images = np.load(path, allow_pickle=False)
  if images.dtype != np.float32 or images.ndim != 4 or images.shape[-1] != in_channels:
    raise ConfigError(f'--inputs={path} holds {images.dtype} {images.shape}: it must be float32 '
                      f'[N, H, W, {in_channels}], already normalised (no resizing is done)')
  return images


def dump_features(config, workdir: str, *, step: int | None, output: str | None,
                  split: str | None, inputs: str | None) -> dict:
  """Features (and, for a split, labels) to .npy files; returns what was written."""
  if jax.process_count() > 1 and inputs:
    raise ConfigError('--inputs runs on one process: run --mode=features without '
                      'jax.distributed (one host)')
  trainer = Trainer(config, workdir)
  teacher, step = trainer.restore_teacher(step)
  if inputs:
    features = _array_features(trainer, teacher,
                               _load_inputs(inputs, trainer.source.info.num_channels))
    labels = None
    output = output or os.path.join(workdir, f'features_inputs_step{step}.npy')
  else:
    split = split or config.data.eval_split
    features, _, labels = protocol.split_outputs(
        trainer.graphdef, teacher, trainer.source, config, trainer.mesh,
        trainer.state_shardings.teacher, split, teacher_temp=config.objective.teacher_temp,
        standardise=trainer.normalization.standardise_teacher_embedding)
    output = output or os.path.join(workdir, f'features_{split}_step{step}.npy')
  written = {'features': output, 'step': step, 'num_examples': int(features.shape[0]),
             'feature_dim': int(features.shape[1])}
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    np.save(output, features)
    if labels is not None:
      written['labels'] = output[:-len('.npy')] + '_labels.npy' if output.endswith(
          '.npy') else output + '_labels.npy'
      np.save(written['labels'], labels)
  return written


def export_teacher(config, workdir: str, *, step: int | None, output: str | None) -> dict:
  trainer = Trainer(config, workdir)
  teacher, step = trainer.restore_teacher(step)
  output = output or os.path.join(workdir, f'backbone_step{step}.npz')
  feature_dim = nnx.merge(trainer.graphdef, teacher).backbone.num_features
  if jax.process_index() == 0:
    export_lib.export_backbone(
        output, teacher['backbone'], model_config=config.model,
        in_channels=trainer.source.info.num_channels, image_size=config.aug.global_size,
        feature_dim=feature_dim, step=step, mean=config.data.mean,
        std=config.data.std)
  return {'export': output, 'step': step}


def _read_torch_checkpoint(path: str) -> dict:
  if not os.path.isfile(path):
    raise ConfigError(f'--import_from={path} does not exist: pass an official DINO .pth file')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError('importing a .pth needs PyTorch: pip install torch==2.13.0 '
                      "(or pip install -e '.[torch]')") from None
  checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(checkpoint, dict):
    raise ConfigError(f'{path} holds a {type(checkpoint).__name__}, not a state dict')
  return {key: value.float().numpy() if hasattr(value, 'numpy') else value
          for key, value in convert_dino.backbone_state_dict(checkpoint).items()}


def import_dino(config, workdir: str, *, import_from: str) -> dict:
  """A step-0 checkpoint whose student and teacher backbones hold the imported weights."""
  state_dict = _read_torch_checkpoint(import_from)
  trainer = Trainer(config, workdir)
  if trainer.checkpointer.all_steps():
    raise ConfigError(f'{workdir} already has checkpoints (steps '
                      f'{trainer.checkpointer.all_steps()}): import into an empty --workdir')
  state = trainer.init(config.seed)
  try:
    backbone = convert_dino.convert(state_dict, jax.device_get(state.student['backbone']))
  except ValueError as error:
    raise ConfigError(str(error)) from None
  backbone = jax.device_put(backbone, trainer.state_shardings.student['backbone'])
  state = state.replace(student={**state.student, 'backbone': backbone},
                        teacher={**state.teacher, 'backbone': backbone})
  checkpoint_lib.write_config_json(config, workdir)
  trainer.save(state, 0, force=True)
  trainer.checkpointer.wait()
  logging.info('imported %d tensors from %s into %s', len(state_dict), import_from,
               trainer.checkpointer.directory)
  return {'import': import_from, 'checkpoint': trainer.checkpointer.directory, 'step': 0,
          'tensors': len(state_dict)}


COMMANDS = {
    'eval': evaluate_checkpoint,
    'features': dump_features,
    'export': export_teacher,
    'import': import_dino,
}
