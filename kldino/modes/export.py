"""`--mode=export`: a checkpoint's teacher backbone as one portable file, for downstream use
without kldino's train state: `--format=npz` (the default) or `--format=pth`, a PyTorch state
dict in the official layout of its family, which DINO's `VisionTransformer` (a plain ViT),
DINOv2's `DinoVisionTransformer` (a ViT with LayerScale, SwiGLU, registers or a mask token) or
DINOv3's (a ViT with RoPE) loads with strict=True (docs/checkpoints.md).

The npz (`np.load(path)` reads it; no pickle): one float32 array per backbone parameter named by
its path below `backbone/` with '/' separators (`cls_token`, `patch_embed/kernel`,
`blocks/0/attn/qkv/kernel`, ...; flax layouts: linear kernels [in, out], convolution kernels
[kh, kw, in, out], qkv outputs [3, heads, head_dim]), and `__meta__`, a JSON string: {"format": 1,
"model": {config.model}, "in_channels", "image_size", "feature_dim", "step", "data": {"mean",
"std"}}. Features are the backbone's output on NHWC images normalised as (x / 255 - mean) / std.
`load_backbone(path)` rebuilds the backbone module from the file alone (docs/checkpoints.md).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from kldino.config.workdir import upgrade
from kldino.errors import ConfigError
from kldino.models import torch_layout
from kldino.models.registry import build_backbone
from kldino.models.vit import VIT_SIZES
from kldino.run import Run

FORMAT = 1
META_KEY = '__meta__'


def _flatten(tree: dict, prefix: str = '') -> dict[str, np.ndarray]:
  flat = {}
  for name, value in tree.items():
    path = f'{prefix}{name}'
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{path}/'))
    else:
      flat[path] = np.asarray(value, dtype=np.float32)
  return flat


def _unflatten(flat: dict[str, np.ndarray], template: dict, prefix: str = '') -> dict:
  tree = {}
  for name, leaf in template.items():
    path = f'{prefix}{name}'
    if isinstance(leaf, dict):
      tree[name] = _unflatten(flat, leaf, f'{path}/')
    elif path not in flat:
      raise ValueError(f'the exported file has no {path}: it was written for another model')
    else:
      tree[name] = flat[path]
  return tree


def export_backbone(path: str, backbone_params: dict, *, model_config, in_channels: int,
                    image_size: int, feature_dim: int, step: int, mean, std):
  """Write the backbone's parameters (host arrays or global jax arrays) and their metadata."""
  params = _flatten(jax.device_get(backbone_params))
  if META_KEY in params:
    raise ValueError(f'a parameter is named {META_KEY}, which the format reserves')
  meta = {
      'format': FORMAT,
      'model': model_config.to_dict(),
      'in_channels': in_channels,
      'image_size': image_size,
      'feature_dim': feature_dim,
      'step': step,
      'data': {
          'mean': list(mean),
          'std': list(std)
      }
  }
  with open(path, 'wb') as f:
    np.savez(f, **params, **{META_KEY: np.array(json.dumps(meta))})


def load_backbone(path: str):
  """(backbone module with the exported parameters, metadata dict)."""
  with np.load(path, allow_pickle=False) as data:
    if META_KEY not in data:
      raise ValueError(f'{path} has no {META_KEY} entry: it is not a kldino export')
    meta = json.loads(str(data[META_KEY]))
    flat = {key: data[key] for key in data.files if key != META_KEY}
  if meta.get('format') != FORMAT:
    raise ValueError(f"{path} has export format {meta.get('format')}; this kldino reads "
                     f'format {FORMAT}')
  model_config = upgrade({'model': meta['model']}).model  # an export of any earlier kldino
  backbone = build_backbone(model_config,
                            in_channels=meta['in_channels'],
                            image_size=meta['image_size'],
                            rngs=nnx.Rngs(0))
  state = nnx.state(backbone, nnx.Param)
  nnx.replace_by_pure_dict(state, _unflatten(flat, nnx.to_pure_dict(state)))
  nnx.update(backbone, state)
  return backbone, meta


FORMATS = ('npz', 'pth')


def export_torch(path: str, backbone_params: dict, model_config):
  """The backbone as a PyTorch state dict in its family's official layout (DINO's ViT, DINOv2's
  or DINOv3's DinoVisionTransformer for a ViT with their options: kldino/models/torch_layout.py)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError('--format=pth needs PyTorch: pip install torch==2.13.0 '
                      "(or pip install -e '.[torch]'), or export --format=npz") from None
  if model_config.name not in VIT_SIZES:
    raise ConfigError(f"--format=pth writes ViTs; model.name='{model_config.name}' has no "
                      'official PyTorch layout: export it with --format=npz')
  try:
    state = torch_layout.to_official(jax.device_get(backbone_params), model_config)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  torch.save({
      key: torch.from_numpy(np.array(value, np.float32)) for key, value in state.items()
  }, path)


def run(config, workdir: str, *, step: int | None, output: str | None, format: str = 'npz') -> dict:  # pylint: disable=redefined-builtin  # the flag's name
  if format not in FORMATS:
    raise ConfigError(f"--format={format}: choose one of {', '.join(FORMATS)}")
  opened = Run(config, workdir)
  teacher, step = opened.restore_teacher(step)
  output = output or os.path.join(workdir, f'backbone_step{step}.{format}')
  if format == 'pth':
    if jax.process_index() == 0:
      export_torch(output, teacher['backbone'], config.model)
    return {'export': output, 'step': step, 'format': format}
  feature_dim = nnx.merge(opened.graphdef, teacher).backbone.num_features
  if jax.process_index() == 0:
    export_backbone(output,
                    teacher['backbone'],
                    model_config=config.model,
                    in_channels=opened.in_channels,
                    image_size=config.aug.global_size,
                    feature_dim=feature_dim,
                    step=step,
                    mean=config.data.mean,
                    std=config.data.std)
  return {'export': output, 'step': step, 'format': format}
