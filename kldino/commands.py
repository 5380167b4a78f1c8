"""What `python -m kldino.main --mode=...` runs besides training. Each opens the workdir as a Run
(kldino/run.py: no optimizer, no train step), reads a checkpoint of it (or, for import, writes
the first one) and writes its result to a file:

    eval         the config's final evaluators (config.evals) on the teacher of the latest (or
                 --step) checkpoint, on any dataset kldino reads -> eval JSON
    linear_eval  DINO's linear evaluation of that teacher (kldino/linear_eval_loop.py)
                 -> linear_eval JSON
    features     its features (eval.n_last_blocks, eval.avgpool_patchtokens) and labels of a
                 split, or of a float32 NHWC .npy of already-preprocessed images -> .npy
    export       its parameters -> .npz (format in kldino/export.py)
    import       an official DINO PyTorch ViT checkpoint -> a step-0 checkpoint of this workdir
    preview      the evaluation views and training crops of a split's first images -> PNGs
                 (kldino/preview.py); reads the dataset, not the workdir
    attention    the teacher's last-block attention from CLS to the patches, per head, of a
                 split's first images or of --inputs -> .npy and PNGs (kldino/attention_maps.py)

import, export and features of --inputs read no dataset: the config and the weights suffice.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from kldino import attention_maps
from kldino import checkpoint as checkpoint_lib
from kldino import convert_dino
from kldino import export as export_lib
from kldino import forward
from kldino import linear_eval_loop
from kldino import optim
from kldino import preview as preview_lib
from kldino import schedules as schedules_lib
from kldino import sharding
from kldino import step as step_lib
from kldino.config_checks import ConfigError
from kldino.data import pipeline
from kldino.evaluate import bank as bank_lib
from kldino.evaluate.evaluators import Evaluators, SplitBanks
from kldino.models import validate_model_config
from kldino.models.vit import VIT_SIZES
from kldino.registry import Registry
from kldino.run import Run
from kldino.train import evaluate, write_eval_json

MODES = Registry('mode', key='--mode')


@MODES.register('eval')
def evaluate_checkpoint(config, workdir: str, *, step: int | None, output: str | None) -> dict:
  run = Run(config, workdir)
  evaluators = Evaluators(run)  # checks the evals entries before anything is read
  teacher, step = run.restore_teacher(step)
  results = evaluate(evaluators, teacher, step, run.teacher_temp(step))
  write_eval_json(results, output or os.path.join(workdir, 'eval.json'))
  return results


@MODES.register('linear_eval')
def linear_eval(config, workdir: str, *, step: int | None, output: str | None) -> dict:
  return linear_eval_loop.linear_eval(Run(config, workdir), step=step, output=output)


def _array_features(run: Run, teacher, images: np.ndarray) -> np.ndarray:
  """Backbone features of host images [N, H, W, C]."""
  options = run.feature_options
  return _batched(
      run, teacher, images,
      lambda params, batch: forward.backbone_features(run.graphdef, params, batch, **options))


def _batched(run: Run, teacher, images: np.ndarray, forward_fn) -> np.ndarray:
  """forward_fn(params, batch) of host images [N, H, W, C], in padded batches sharded over the
  mesh."""
  batch_size = run.config.eval.batch_size
  features_fn = jax.jit(forward_fn,
                        in_shardings=(run.param_shardings, sharding.batch_sharding(run.mesh)),
                        out_shardings=sharding.replicated(run.mesh))
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
  return images


def _check_input_size(config, images: np.ndarray, path: str):
  """Images the backbone can take: square, and a whole number of patches."""
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


def _split_features(run: Run, teacher, split: str) -> tuple[np.ndarray, np.ndarray]:
  run.source.num_examples(split)  # an unknown split fails here, with the splits it has
  banks = SplitBanks(run, feature_options=run.feature_options, cluster_stats=False)
  banks.start(teacher)
  return bank_lib.host_features(banks.bank(teacher, split))


@MODES.register('features')
def dump_features(config, workdir: str, *, step: int | None, output: str | None, split: str | None,
                  inputs: str | None) -> dict:
  """Features (and, for a split, labels) to .npy files; returns what was written."""
  if jax.process_count() > 1 and inputs:
    raise ConfigError('--inputs runs on one process: run --mode=features without '
                      'jax.distributed (one host)')
  run = Run(config, workdir)
  images = _load_inputs(inputs, run.in_channels) if inputs else None
  if inputs:
    _check_input_size(config, images, inputs)
  if not inputs:
    run.source  # pylint: disable=pointless-statement  # a bad dataset fails before any reading
  teacher, step = run.restore_teacher(step)
  if inputs:
    features, labels = _array_features(run, teacher, images), None
    output = output or os.path.join(workdir, f'features_inputs_step{step}.npy')
  else:
    split = split or config.data.eval_split
    try:
      features, labels = _split_features(run, teacher, split)
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
      written['labels'] = output[:-len('.npy')] + '_labels.npy' if output.endswith(
          '.npy') else output + '_labels.npy'
      np.save(written['labels'], labels)
  return written


@MODES.register('export')
def export_teacher(config, workdir: str, *, step: int | None, output: str | None) -> dict:
  run = Run(config, workdir)
  teacher, step = run.restore_teacher(step)
  output = output or os.path.join(workdir, f'backbone_step{step}.npz')
  feature_dim = nnx.merge(run.graphdef, teacher).backbone.num_features
  if jax.process_index() == 0:
    export_lib.export_backbone(output,
                               teacher['backbone'],
                               model_config=config.model,
                               in_channels=run.in_channels,
                               image_size=config.aug.global_size,
                               feature_dim=feature_dim,
                               step=step,
                               mean=config.data.mean,
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
  try:
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as error:  # pylint: disable=broad-except  # torch raises many kinds
    raise ConfigError(
        f'--import_from={path} is not a PyTorch checkpoint that loads without '
        f'running code ({type(error).__name__}): pass an official DINO .pth file') from None
  if not isinstance(checkpoint, dict):
    raise ConfigError(f'{path} holds a {type(checkpoint).__name__}, not a state dict')
  state_dict = convert_dino.backbone_state_dict(checkpoint)
  not_tensors = sorted(key for key, value in state_dict.items() if not hasattr(value, 'numpy'))
  if not_tensors:
    raise ConfigError(f'--import_from={path} is not a DINO backbone: {not_tensors[0]!r} is not '
                      'a tensor; pass an official DINO .pth file (a backbone or a training '
                      'checkpoint)')
  return {key: value.float().numpy() for key, value in state_dict.items()}


def _fresh_state(run: Run):
  """A freshly initialised train state, without reading the dataset: the optimizer state's
  structure does not depend on the schedules' values, so one-step epochs serve to build it."""
  config = run.config
  optimizer = optim.make_optimizer(config.optim, schedules_lib.make_schedules(config, 1))
  init, shardings = step_lib.jit_init(step_lib.make_init_fn(config, run.in_channels, optimizer),
                                      run.mesh, config.mesh.fsdp_min_size)
  return init(config.seed), shardings


@MODES.register('import')
def import_dino(config, workdir: str, *, import_from: str) -> dict:
  """A step-0 checkpoint whose student and teacher backbones hold the imported weights."""
  state_dict = _read_torch_checkpoint(import_from)
  run = Run(config, workdir)
  if run.checkpointer.all_steps():
    raise ConfigError(f'{workdir} already has checkpoints (steps '
                      f'{run.checkpointer.all_steps()}): import into an empty --workdir')
  state, shardings = _fresh_state(run)
  try:
    backbone = convert_dino.convert(state_dict, jax.device_get(state.student['backbone']))
  except ValueError as error:
    raise ConfigError(str(error)) from None
  backbone = jax.device_put(backbone, shardings.student['backbone'])
  state = state.replace(student={
      **state.student, 'backbone': backbone
  },
                        teacher={
                            **state.teacher, 'backbone': backbone
                        })
  checkpoint_lib.write_config_json(config, workdir)
  run.checkpointer.save(0,
                        state,
                        checkpoint_lib.position_meta(config, 0, None, run.data_shards),
                        force=True)
  run.checkpointer.wait()
  logging.info('imported %d tensors from %s into %s', len(state_dict), import_from,
               run.checkpointer.directory)
  return {
      'import': import_from,
      'checkpoint': run.checkpointer.directory,
      'step': 0,
      'tensors': len(state_dict)
  }


@MODES.register('preview')
def preview(config, workdir: str, *, output: str, split: str | None, num_images: int) -> dict:
  del workdir  # the preview reads the config's data only
  run = Run(config, output)
  split = split or config.data.eval_split
  try:
    run.source.num_examples(split)
  except ValueError as error:
    raise ConfigError(f'--split={split}: {error}') from None
  if jax.process_index() != 0:
    return {}
  return preview_lib.write_preview(run.source, config, split, num_images, output)


def _attention_images(run: Run, split: str | None, num_images: int, inputs: str | None):
  """The images to look at, normalised, as the backbone takes them, and their index entries."""
  config = run.config
  if inputs:
    images = _load_inputs(inputs, run.in_channels)
    _check_input_size(config, images, inputs)
    return images, [{
        'file': f'{os.path.abspath(inputs)}[{i}]',
        'label': None
    } for i in range(len(images))]
  split = split or config.data.eval_split
  try:
    run.source.num_examples(split)
  except ValueError as error:
    raise ConfigError(f'--split={split}: {error}') from None
  views = list(pipeline.preview_views(run.source, split, config, num_images, crops=False))
  if not views:
    raise ConfigError(f"--split={split} has no image that decodes: choose another split")
  return (np.stack([view['eval'] for view in views]), [{
      'file': view['file'],
      'label': int(view['label'])
  } for view in views])


@MODES.register('attention')
def attention(config, workdir: str, *, step: int | None, output: str, split: str | None,
              num_images: int, inputs: str | None) -> dict:
  """The teacher's CLS attention maps (kldino/attention_maps.py) of --inputs or of the first
  --num_images images of --split."""
  if config.model.name not in VIT_SIZES:
    raise ConfigError(f'--mode=attention shows a ViT\'s self-attention: model.name='
                      f'{config.model.name} has none; use it on a run of a vit_* model')
  if jax.process_count() > 1:
    raise ConfigError('--mode=attention runs on one process: run it without jax.distributed')
  run = Run(config, workdir)
  images, index = _attention_images(run, split, num_images, inputs)
  teacher, step = run.restore_teacher(step)
  maps = _batched(run, teacher, images,
                  lambda params, batch: forward.cls_attention(run.graphdef, params, batch))
  side = images.shape[1] // config.model.patch_size
  pixels = np.stack(
      [preview_lib.to_uint8(image, config.data.mean, config.data.std) for image in images])
  written = attention_maps.write_attention(pixels, maps, (side, side), index, output)
  return {**written, 'step': step}
