"""The official PyTorch layout of a ViT backbone, both ways: the state dict of DINO's
`vision_transformer.VisionTransformer`, of DINOv2's `DinoVisionTransformer` and of DINOv3's
`DinoVisionTransformer` <-> kldino's parameter tree.

Linear weights [out, in] are kernels [in, out], the OIHW patch convolution an HWIO kernel, norm
weights `scale`; the qkv features keep PyTorch's [3, heads, head_dim] order; tokens
(`cls_token`, `pos_embed`, `register_tokens`, `mask_token`) and LayerScale's `gamma` are the
same arrays. DINOv3 names the registers `storage_tokens`, splits the SwiGLU's first linear in
`w1` and `w2` (kldino's fused `w12` holds both) and holds two buffers that kldino computes:
`rope_embed.periods` and each masked qkv bias's `bias_mask`. The table of keys:
docs/checkpoints.md ("Import mapping").
"""
from __future__ import annotations

import math
import re

import numpy as np

from kldino.models.rope import rope_periods
from kldino.models.vit import VIT_SIZES, key_bias_mask

# The block keys of all three; DINOv2's training checkpoints chunk the blocks for FSDP
# (blocks.<chunk>.<index>.*), its hub files do not.
_BLOCK = re.compile(
    r'^blocks\.(?:\d+\.)?(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|'
    r'mlp\.w12|mlp\.w1|mlp\.w2|mlp\.w3|ls1|ls2)\.(weight|bias|gamma|bias_mask)$')
TOKENS = ('cls_token', 'pos_embed', 'register_tokens', 'mask_token')
_STORAGE = 'storage_tokens'  # DINOv3's register_tokens
PERIODS = 'rope_embed.periods'  # DINOv3's RopePositionEmbedding buffer
_PATCH_WEIGHT = 'patch_embed.proj.weight'
FAMILIES = ('dino', 'dinov2', 'dinov3')


def _linear(weight: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(weight.T)


def kldino_entry(key: str, value: np.ndarray) -> tuple[tuple, np.ndarray]:
  """(kldino path, array in kldino's layout) of one official tensor (DINO's and DINOv2's keys;
  canonical() brings DINOv3's to them)."""
  if key in TOKENS:
    return (key,), value
  if key == _PATCH_WEIGHT:
    return ('patch_embed', 'kernel'), np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if key == 'patch_embed.proj.bias':
    return ('patch_embed', 'bias'), value
  if key in ('norm.weight', 'norm.bias'):
    return ('norm', 'scale' if key.endswith('weight') else 'bias'), value
  if key.startswith(('cls_norm.', 'local_cls_norm.')):
    raise ValueError(f"'{key}': DINOv3's untied CLS norms (ViT-L SAT-493M, ViT-7B) are not "
                     'supported: import a model without them (the LVD-1689M ViT-S/S+/B/L)')
  match = _BLOCK.match(key)
  if match is None:
    raise ValueError(f"unexpected key '{key}' in the DINO state dict: only ViT backbone keys "
                     '(cls_token, pos_embed, register_tokens, storage_tokens, mask_token, '
                     'rope_embed.periods, patch_embed.*, blocks.*, norm.*) can be imported')
  index, module, kind = match.groups()
  path = ('blocks', int(index), *module.split('.'))
  if module.startswith('norm'):
    return (*path, 'scale' if kind == 'weight' else 'bias'), value
  if kind == 'gamma':  # LayerScale
    return (*path, 'gamma'), value
  return (*path,
          'kernel' if kind == 'weight' else 'bias'), (_linear(value) if kind == 'weight' else value)


def _folded_bias(bias: np.ndarray, mask: np.ndarray, key: str) -> np.ndarray:
  """The qkv bias DINOv3's forward adds (bias * bias_mask) on the query and value thirds; the
  key third stays as stored (kldino's model.mask_k_bias zeroes it in the forward)."""
  third = mask.shape[0] // 3
  if not np.all(np.isfinite(mask)) or np.any(mask[third:2 * third]):
    raise ValueError(f'{key} is not a key-bias mask (finite, zero on the key third): the file '
                     'was not written by a DINOv3 model after init_weights')
  return bias * np.where(key_bias_mask(third) == 0, 1.0, mask).astype(bias.dtype)


def canonical(state_dict: dict) -> dict:
  """A state dict of any family with DINO's and DINOv2's keys: DINOv3's storage tokens as
  register_tokens, its w1 and w2 as the fused w12 (w1 the gated half, first), each masked qkv
  bias folded with its bias_mask, and the buffers (periods, masks) dropped."""
  state = {
      'register_tokens' if key == _STORAGE else key: value
      for key, value in state_dict.items()
      if key != PERIODS and not key.endswith('.bias_mask')
  }
  for key in [key for key in state if key.endswith('attn.qkv.bias')]:
    if f'{key}_mask' in state_dict:
      state[key] = _folded_bias(state[key], np.asarray(state_dict[f'{key}_mask']), f'{key}_mask')
  for key in [key for key in state if '.mlp.w1.' in key]:
    second = key.replace('.w1.', '.w2.')
    if second not in state:
      raise ValueError(f"the state dict has '{key}' but not '{second}': not a DINOv3 SwiGLU")
    state[key.replace('.w1.', '.w12.')] = np.concatenate([state.pop(key), state.pop(second)])
  return state


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


def layout_family(model_config) -> str:
  """Whose layout holds a ViT config: 'dinov3' (RoPE: DINOv3's DinoVisionTransformer), 'dinov2'
  (LayerScale, SwiGLU, registers or a mask token: DINOv2's) or 'dino' (DINO's VisionTransformer)."""
  if model_config.pos_embed == 'rope':
    return 'dinov3'
  if (model_config.layerscale or model_config.ffn != 'mlp' or model_config.num_registers or
      model_config.mask_token):
    return 'dinov2'
  return 'dino'


def _as_dinov3(state: dict, model_config) -> dict:
  """DINOv2's keys -> DINOv3's: storage tokens, w12 split in w1 and w2, the periods buffer."""
  renamed = {}
  for key, value in state.items():
    if '.mlp.w12.' in key:
      first, second = np.split(value, 2)
      renamed[key.replace('.w12.', '.w1.')], renamed[key.replace('.w12.', '.w2.')] = first, second
    else:
      renamed[_STORAGE if key == 'register_tokens' else key] = value
  size = VIT_SIZES[model_config.name]
  renamed[PERIODS] = rope_periods(model_config.rope_base, size['dim'] // size['num_heads'])
  return renamed


def to_official(backbone_params: dict, model_config) -> dict[str, np.ndarray]:
  """The official state dict of kldino backbone parameters (a pure dict of host arrays) in the
  layout of the config's family (layout_family). DINOv2's and DINOv3's models always hold a mask
  token (zeros when the kldino model has none, as they initialise it); with model.mask_k_bias,
  DINOv3's qkv gets its bias_mask, the others the bias with the key third zeroed (as it acts)."""
  family = layout_family(model_config)
  state = dict(official_entry(path, value) for path, value in _leaves(backbone_params))
  if family != 'dino' and 'mask_token' not in state:
    state['mask_token'] = np.zeros((1, state['cls_token'].shape[-1]), np.float32)
  if model_config.mask_k_bias:
    for key in [key for key in state if key.endswith('attn.qkv.bias')]:
      mask = key_bias_mask(state[key].shape[0] // 3)
      if family == 'dinov3':
        state[f'{key}_mask'] = mask
      else:
        state[key] = state[key] * mask
  return _as_dinov3(state, model_config) if family == 'dinov3' else state


def rope_base(periods: np.ndarray) -> float | None:
  """The base of RoPE periods base^(i / n), i < n, to 4 significant digits (None for n < 2)."""
  if len(periods) < 2:
    return None
  return float(f'{float(periods[1])**len(periods):.4g}')


# The feed-forward's first linear: its rows per unit of hidden width.
_FFN_ROWS = {'mlp.fc1': 1, 'mlp.w12': 2, 'mlp.w1': 1}


def _ffn_width(state_dict: dict, matches: list) -> int | None:
  for match in matches:
    module, kind = match.groups()[1:]
    if kind == 'weight' and module in _FFN_ROWS:
      return int(state_dict[match.string].shape[0]) // _FFN_ROWS[module]
  return None


def describe(state_dict: dict) -> dict:
  """The architecture a backbone state dict holds (its shapes and keys): width, depth, patch
  size, the position table's grid (0: none), registers, LayerScale, the feed-forward and its
  width, the mask token, the position embedding (RoPE's base) and the masked key bias."""
  matches = [match for match in map(_BLOCK.match, state_dict) if match]
  blocks = {int(match.group(1)) for match in matches}
  block_parts = {match.groups()[1:] for match in matches}
  positions = state_dict['pos_embed'].shape[1] - 1 if 'pos_embed' in state_dict else 0
  registers = state_dict.get('register_tokens', state_dict.get(_STORAGE))
  rope = PERIODS in state_dict
  return {
      'dim': int(state_dict['cls_token'].shape[-1]) if 'cls_token' in state_dict else None,
      'depth': max(blocks) + 1 if blocks else 0,
      'patch_size':
          (int(state_dict[_PATCH_WEIGHT].shape[-1]) if _PATCH_WEIGHT in state_dict else None),
      'grid': math.isqrt(positions),
      'num_registers': int(registers.shape[1]) if registers is not None else 0,
      'layerscale': ('ls1', 'gamma') in block_parts,
      'ffn': 'swiglu' if {('mlp.w12', 'weight'), ('mlp.w1', 'weight')} & block_parts else 'mlp',
      'ffn_width': _ffn_width(state_dict, matches),
      'mask_token': 'mask_token' in state_dict,
      'pos_embed': 'rope' if rope else 'learned',
      'rope_base': rope_base(np.asarray(state_dict[PERIODS])) if rope else None,
      'mask_k_bias': ('attn.qkv', 'bias_mask') in block_parts,
  }
