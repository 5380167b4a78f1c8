"""The official PyTorch layout of a ViT backbone, both ways: the state dict of DINO's
`vision_transformer.VisionTransformer` and of DINOv2's `DinoVisionTransformer` <-> kldino's
parameter tree.

Linear weights [out, in] are kernels [in, out], the OIHW patch convolution an HWIO kernel, norm
weights `scale`; the qkv features keep PyTorch's [3, heads, head_dim] order; tokens
(`cls_token`, `pos_embed`, `register_tokens`, `mask_token`) and LayerScale's `gamma` are the
same arrays. The table of keys: docs/checkpoints.md ("Import mapping").
"""
from __future__ import annotations

import math
import re

import numpy as np

# DINO's and DINOv2's block keys; DINOv2's training checkpoints chunk the blocks for FSDP
# (blocks.<chunk>.<index>.*), its hub files do not.
_BLOCK = re.compile(
    r'^blocks\.(?:\d+\.)?(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|'
    r'mlp\.w12|mlp\.w3|ls1|ls2)\.(weight|bias|gamma)$')
TOKENS = ('cls_token', 'pos_embed', 'register_tokens', 'mask_token')
_PATCH_WEIGHT = 'patch_embed.proj.weight'


def _linear(weight: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(weight.T)


def kldino_entry(key: str, value: np.ndarray) -> tuple[tuple, np.ndarray]:
  """(kldino path, array in kldino's layout) of one official tensor."""
  if key in TOKENS:
    return (key,), value
  if key == _PATCH_WEIGHT:
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


def official_entry(path: tuple, value: np.ndarray) -> tuple[str, np.ndarray]:
  """(official key, array in PyTorch's layout) of one kldino backbone parameter; the inverse of
  kldino_entry."""
  if path[0] in TOKENS:
    return path[0], value
  if path[0] == 'patch_embed':
    if path[1:] not in (('kernel',), ('bias',)):
      raise ValueError('a ViT with the conv stem (model.stem=conv) has no official PyTorch '
                       'layout: export it with --format=npz')
    if path[1] == 'bias':
      return 'patch_embed.proj.bias', value
    return _PATCH_WEIGHT, np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  *module, kind = [str(part) for part in path]
  name = {'scale': 'weight', 'kernel': 'weight'}.get(kind, kind)
  return '.'.join([*module, name]), _linear(value) if kind == 'kernel' else value


def _leaves(tree: dict, prefix: tuple = ()):
  for name, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, (*prefix, name))
    else:
      yield (*prefix, name), np.asarray(value, np.float32)


def to_official(backbone_params: dict, *, dinov2: bool) -> dict[str, np.ndarray]:
  """The official state dict of kldino backbone parameters (a pure dict of host arrays): DINO's
  keys, or with `dinov2` DINOv2's, whose DinoVisionTransformer always holds a mask token (zeros
  when the kldino model has none, as DINOv2 initialises it)."""
  state = dict(official_entry(path, value) for path, value in _leaves(backbone_params))
  if dinov2 and 'mask_token' not in state:
    state['mask_token'] = np.zeros((1, state['cls_token'].shape[-1]), np.float32)
  return state


def uses_dinov2_layout(model_config) -> bool:
  """Whether a ViT config has any of DINOv2's options (only DinoVisionTransformer holds it)."""
  return bool(model_config.layerscale or model_config.ffn != 'mlp' or model_config.num_registers or
              model_config.mask_token)


def describe(state_dict: dict) -> dict:
  """The architecture a backbone state dict holds (its shapes and keys): width, depth, patch
  size, the position table's grid, registers, LayerScale, the feed-forward, the mask token."""
  blocks = {int(match.group(1)) for match in map(_BLOCK.match, state_dict) if match}
  positions = state_dict['pos_embed'].shape[1] - 1 if 'pos_embed' in state_dict else 0
  return {
      'dim': int(state_dict['cls_token'].shape[-1]) if 'cls_token' in state_dict else None,
      'depth': max(blocks) + 1 if blocks else 0,
      'patch_size':
          (int(state_dict[_PATCH_WEIGHT].shape[-1]) if _PATCH_WEIGHT in state_dict else None),
      'grid': math.isqrt(positions),
      'num_registers':
          (int(state_dict['register_tokens'].shape[1]) if 'register_tokens' in state_dict else 0),
      'layerscale': 'blocks.0.ls1.gamma' in state_dict,
      'ffn': 'swiglu' if 'blocks.0.mlp.w12.weight' in state_dict else 'mlp',
      'mask_token': 'mask_token' in state_dict,
  }
