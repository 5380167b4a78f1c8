"""`--mode=import`: official DINO (PyTorch) ViT weights -> the workdir's step-0 checkpoint, whose
student and teacher backbones hold them (the head is freshly initialised; no dataset is read).

The state dict of DINO's `vision_transformer.VisionTransformer` (the `module.` and `backbone.`
prefixes of its training checkpoints stripped, the `head.*` keys skipped) maps key by key onto
kldino's ViT: linear weights [out, in] become kernels [in, out], the OIHW patch convolution an
HWIO kernel, and the qkv features keep PyTorch's [3, heads, head_dim] order. The table of keys:
docs/checkpoints.md ("Import mapping").
"""
from __future__ import annotations

import os
import re

import jax
import numpy as np
from absl import logging

from kldino import checkpoint as checkpoint_lib
from kldino.core import program as program_lib
from kldino.errors import ConfigError
from kldino.run import Run

# DINO's and DINOv2's block keys; DINOv2's training checkpoints chunk the blocks for FSDP
# (blocks.<chunk>.<index>.*), its hub files do not.
_BLOCK = re.compile(
    r'^blocks\.(?:\d+\.)?(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|'
    r'mlp\.w12|mlp\.w3|ls1|ls2)\.(weight|bias|gamma)$')
# DINOv2's tokens, in kldino's layout already.
_TOKENS = ('cls_token', 'pos_embed', 'register_tokens', 'mask_token')
_SKIPPED_PREFIXES = ('head.',)
_STRIPPED_PREFIXES = ('module.', 'backbone.')


def _strip(key: str) -> str:
  changed = True
  while changed:
    changed = False
    for prefix in _STRIPPED_PREFIXES:
      if key.startswith(prefix):
        key, changed = key[len(prefix):], True
  return key


def backbone_state_dict(checkpoint: dict, *, which: str = 'teacher') -> dict:
  """The ViT's tensors from a published backbone file or a full DINO training checkpoint
  (a dict with 'teacher' and 'student' entries; `which` picks one), prefixes stripped."""
  if which in checkpoint and isinstance(checkpoint[which], dict):
    checkpoint = checkpoint[which]
  return {
      _strip(key): value
      for key, value in checkpoint.items()
      if not _strip(key).startswith(_SKIPPED_PREFIXES)
  }


def _linear(weight: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(weight.T)


def _target(key: str, value: np.ndarray) -> tuple[tuple, np.ndarray]:
  """(kldino path, array in kldino's layout) of one PyTorch tensor."""
  if key in _TOKENS:
    return (key,), value
  if key == 'patch_embed.proj.weight':
    return ('patch_embed', 'kernel'), np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if key == 'patch_embed.proj.bias':
    return ('patch_embed', 'bias'), value
  if key in ('norm.weight', 'norm.bias'):
    return ('norm', 'scale' if key.endswith('weight') else 'bias'), value
  match = _BLOCK.match(key)
  if match is None:
    raise ValueError(f"unexpected key '{key}' in the DINO state dict: only ViT backbone keys "
                     '(cls_token, pos_embed, register_tokens, mask_token, patch_embed.*, '
                     'blocks.*, norm.*) can be imported')
  index, module, kind = match.groups()
  path = ('blocks', int(index), *module.split('.'))
  if module.startswith('norm'):
    return (*path, 'scale' if kind == 'weight' else 'bias'), value
  if kind == 'gamma':  # LayerScale
    return (*path, 'gamma'), value
  return (*path,
          'kernel' if kind == 'weight' else 'bias'), (_linear(value) if kind == 'weight' else value)


def convert(state_dict: dict, backbone_params: dict) -> dict:
  """A copy of `backbone_params` (kldino's pure dict) with every tensor from `state_dict`.

  Every parameter of the kldino backbone must be present with the matching shape, and every
  tensor of the state dict must land somewhere: anything else is an error naming the key.
  """
  converted = {}
  for key, value in state_dict.items():
    path, array = _target(key, np.asarray(value, dtype=np.float32))
    node = converted
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = array

  def place(expected, imported, prefix):
    result = {}
    for name, leaf in expected.items():
      where = f'{prefix}{name}'
      if name not in imported:
        raise ValueError(f'the DINO state dict has nothing for backbone/{where}: it is not the '
                         "architecture this config builds (check model.name and patch_size)")
      if isinstance(leaf, dict):
        result[name] = place(leaf, imported[name], f'{where}/')
        continue
      if tuple(imported[name].shape) != tuple(leaf.shape):
        raise ValueError(f'backbone/{where} has shape {tuple(imported[name].shape)} in the DINO '
                         f'file and {tuple(leaf.shape)} in this config: use the config of the '
                         'same architecture and crop size (e.g. configs/imagenet_vit_s16.py '
                         'for ViT-S/16 at 224)')
      result[name] = imported[name]
    extra = sorted(set(imported) - set(expected))
    if extra:
      raise ValueError(f'the DINO state dict has {prefix}{extra[0]}, which this config\'s '
                       'backbone lacks (a deeper model?): use the matching model.name')
    return result

  return place(backbone_params, converted, '')


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
  state_dict = backbone_state_dict(checkpoint)
  not_tensors = sorted(key for key, value in state_dict.items() if not hasattr(value, 'numpy'))
  if not_tensors:
    raise ConfigError(f'--import_from={path} is not a DINO backbone: {not_tensors[0]!r} is not '
                      'a tensor; pass an official DINO .pth file (a backbone or a training '
                      'checkpoint)')
  return {key: value.float().numpy() for key, value in state_dict.items()}


def run(config, workdir: str, *, import_from: str) -> dict:
  """A step-0 checkpoint whose student and teacher backbones hold the imported weights."""
  state_dict = _read_torch_checkpoint(import_from)
  opened = Run(config, workdir)
  if opened.checkpointer.all_steps():
    raise ConfigError(f'{workdir} already has checkpoints (steps '
                      f'{opened.checkpointer.all_steps()}): import into an empty --workdir')
  # The optimizer state's structure does not depend on the schedules' values: one-step epochs
  # build it without reading the dataset.
  program = program_lib.build(config, opened.graphdef, opened.in_channels, opened.mesh, 1)
  state = program.init(config.seed)
  try:
    backbone = convert(state_dict, jax.device_get(state.student['backbone']))
  except ValueError as error:
    raise ConfigError(str(error)) from None
  backbone = jax.device_put(backbone, program.state_shardings.student['backbone'])
  state = state.replace(student={
      **state.student, 'backbone': backbone
  },
                        teacher={
                            **state.teacher, 'backbone': backbone
                        })
  checkpoint_lib.write_config_json(config, workdir)
  opened.checkpointer.save(0,
                           state,
                           checkpoint_lib.position_meta(config, 0, None, opened.data_shards),
                           force=True)
  opened.checkpointer.wait()
  logging.info('imported %d tensors from %s into %s', len(state_dict), import_from,
               opened.checkpointer.directory)
  return {
      'import': import_from,
      'checkpoint': opened.checkpointer.directory,
      'step': 0,
      'tensors': len(state_dict)
  }
