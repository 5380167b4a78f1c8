"""`--mode=import`: official DINO, DINOv2 or DINOv3 (PyTorch) ViT weights -> the workdir's
step-0 checkpoint, whose student and teacher backbones hold them (the head is freshly
initialised; no dataset is read).

The state dict of DINO's `vision_transformer.VisionTransformer` or DINOv2's or DINOv3's
`DinoVisionTransformer` (the `module.` and `backbone.` prefixes of training checkpoints stripped,
the `head.*` keys skipped) maps key by key onto kldino's ViT (kldino/models/torch_layout.py).
The architecture it holds (width, depth, patch, position grid or RoPE, registers, LayerScale,
the feed-forward, mask token, masked key bias) is read from its keys and shapes first: a config
that builds another is refused in one line naming the published model it matches
(`--config=configs/pretrained.py:NAME`).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from kldino import checkpoint as checkpoint_lib
from kldino.core import program as program_lib
from kldino.errors import ConfigError
from kldino.models import hub
from kldino.models import torch_layout
from kldino.run import Run

_SKIPPED_PREFIXES = ('head.', 'dino_head.', 'ibot_head.')  # DINO's and DINOv2's heads
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


def convert(state_dict: dict, backbone_params: dict) -> dict:
  """A copy of `backbone_params` (kldino's pure dict) with every tensor from `state_dict` (its
  buffers, DINOv3's RoPE periods and key-bias masks, folded in or checked by the import).

  Every parameter of the kldino backbone must be present with the matching shape, and every
  tensor of the state dict must land somewhere: anything else is an error naming the key.
  """
  converted = {}
  arrays = {key: np.asarray(value, dtype=np.float32) for key, value in state_dict.items()}
  for key, value in torch_layout.canonical(arrays).items():
    path, array = torch_layout.kldino_entry(key, value)
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
    raise ConfigError(
        f'--import_from={path} does not exist: pass an official DINO, DINOv2 or DINOv3 .pth '
        'file')
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
        f'running code ({type(error).__name__}): pass an official DINO, DINOv2 or DINOv3 .pth file'
    ) from None
  if not isinstance(checkpoint, dict):
    raise ConfigError(f'{path} holds a {type(checkpoint).__name__}, not a state dict')
  state_dict = backbone_state_dict(checkpoint)
  not_tensors = sorted(key for key, value in state_dict.items() if not hasattr(value, 'numpy'))
  if not_tensors:
    raise ConfigError(
        f'--import_from={path} is not a DINO backbone: {not_tensors[0]!r} is not '
        'a tensor; pass an official DINO, DINOv2 or DINOv3 .pth file (a backbone or a training '
        'checkpoint)')
  return {key: value.float().numpy() for key, value in state_dict.items()}


def check_architecture(state_dict: dict, config, path: str):
  """ConfigError when the state dict holds another ViT than `config` builds: what differs, and
  the published models of that architecture (configs/pretrained.py's names)."""
  found = torch_layout.describe(state_dict)
  expected = hub.architecture(config.model, config.aug.global_size)
  differences = [
      f'{key} {found[key]} (config: {expected[key]})' for key in found
      if found[key] != expected[key]
  ]
  if not differences:
    return
  names = hub.matching(found)
  fix = (f'pass --config=configs/pretrained.py:{names[0]}'
         if names else 'set model.name, patch_size, num_registers, layerscale, ffn, mlp_ratio, '
         'mask_token, pos_embed, rope_base, mask_k_bias and aug.global_size (the position grid x '
         'patch_size) to match it')
  raise ConfigError(f'{path} holds another ViT than this config builds: ' + ', '.join(differences) +
                    f'; {fix}')


def run(config, workdir: str, *, import_from: str) -> dict:
  """A step-0 checkpoint whose student and teacher backbones hold the imported weights."""
  state_dict = _read_torch_checkpoint(import_from)
  check_architecture(state_dict, config, import_from)
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
  gram = {} if state.gram_teacher is None else {'gram_teacher': backbone}  # Gram anchoring's too
  state = state.replace(student={
      **state.student, 'backbone': backbone
  },
                        teacher={
                            **state.teacher, 'backbone': backbone
                        },
                        **gram)
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
