"""The published ViT backbones kldino imports by name, each as its official hub entry builds it
(facebookresearch/dino hubconf.py; dinov2/hub/backbones.py; dinov3/hub/backbones.py): the
`config.model` options and the image size of its position table (DINOv3, without one: the
crop size its hub entry names). configs/pretrained.py makes a config of each; the import names
the one whose architecture a state dict holds (kldino/modes/import_dino.py).
"""
from __future__ import annotations

from kldino.models.rope import rope_periods
from kldino.models.torch_layout import rope_base
from kldino.models.vit import VIT_SIZES, ffn_width

# DINO's and DINOv2's ViT: a learned position table, the key bias, LayerNorm(eps=1e-6), MLP x4.
_LEARNED = dict(pos_embed='learned', mask_k_bias=False, norm_eps=1e-6, mlp_ratio=4.0)


def _dino(name: str, patch_size: int) -> dict:
  # DINO resizes the position table by the scale factor (grid + 0.1) / trained grid.
  return dict(_LEARNED,
              name=name,
              patch_size=patch_size,
              image_size=224,
              layerscale=0.0,
              ffn='mlp',
              num_registers=0,
              mask_token=False,
              pos_interpolation='torch',
              interpolate_offset=0.1,
              interpolate_antialias=False)


def _dinov2(name: str, registers: bool) -> dict:
  # The hub models: 518 px tables (37 x 37 patches), LayerScale (init 1), the fused SwiGLU for
  # ViT-g; the register variants resize the table by size with antialiasing, the others by the
  # scale factor with offset 0.1.
  return dict(_LEARNED,
              name=name,
              patch_size=14,
              image_size=518,
              layerscale=1.0,
              ffn='swiglu' if name == 'vit_giant2' else 'mlp',
              num_registers=4 if registers else 0,
              mask_token=True,
              pos_interpolation='torch',
              interpolate_offset=0.0 if registers else 0.1,
              interpolate_antialias=registers)


def _dinov3(name: str, ffn: str, mlp_ratio: float) -> dict:
  # dinov3/hub/backbones.py: patch 16, 4 storage tokens, LayerScale 1e-5, the masked key bias,
  # 'layernormbf16' (eps 1e-5), RoPE base 100 with 'separate' coordinates, rescaled in training
  # by up to 2 (at inference no augmentation), img_size 224 (no table: only the crop size).
  return dict(name=name,
              patch_size=16,
              image_size=224,
              layerscale=1e-5,
              ffn=ffn,
              mlp_ratio=mlp_ratio,
              num_registers=4,
              mask_token=True,
              pos_embed='rope',
              rope_base=100.0,
              rope_normalize_coords='separate',
              rope_shift_coords=0.0,
              rope_jitter_coords=0.0,
              rope_rescale_coords=2.0,
              mask_k_bias=True,
              norm_eps=1e-5)


_DINOV2_SIZES = {'s': 'vit_small', 'b': 'vit_base', 'l': 'vit_large', 'g': 'vit_giant2'}
HUB_MODELS = {
    'dino_vits16': _dino('vit_small', 16),
    'dino_vits8': _dino('vit_small', 8),
    'dino_vitb16': _dino('vit_base', 16),
    'dino_vitb8': _dino('vit_base', 8),
    **{
        f'dinov2_vit{size}14': _dinov2(name, False) for size, name in _DINOV2_SIZES.items()
    },
    **{
        f'dinov2_vit{size}14_reg': _dinov2(name, True) for size, name in _DINOV2_SIZES.items()
    },
    'dinov3_vits16': _dinov3('vit_small', 'mlp', 4.0),
    'dinov3_vits16plus': _dinov3('vit_small', 'swiglu', 6.0),  # ffn_ratio 6, SwiGLUFFN
    'dinov3_vitb16': _dinov3('vit_base', 'mlp', 4.0),
    'dinov3_vitl16': _dinov3('vit_large', 'mlp', 4.0),
}


def architecture(model, image_size: int) -> dict:
  """What a ViT's options (`config.model`, or a HUB_MODELS entry) build, as torch_layout.describe
  reads it from a state dict."""
  size = VIT_SIZES.get(model['name'], {})
  rope = model['pos_embed'] == 'rope' and bool(size)
  head_dim = size['dim'] // size['num_heads'] if size else None
  return {
      'dim': size.get('dim'),
      'depth': size.get('depth', 0),
      'patch_size': model['patch_size'],
      'grid': 0 if model['pos_embed'] == 'rope' else image_size // model['patch_size'],
      'num_registers': model['num_registers'],
      'layerscale': bool(model['layerscale']),
      'ffn': model['ffn'],
      'ffn_width': ffn_width(size['dim'], model['mlp_ratio'], model['ffn']) if size else None,
      'mask_token': bool(model['mask_token']),
      'pos_embed': model['pos_embed'],
      # read back from the periods as describe does, so that both round alike
      'rope_base': rope_base(rope_periods(model['rope_base'], head_dim)) if rope else None,
      'mask_k_bias': bool(model['mask_k_bias']),
  }


def matching(description: dict) -> list[str]:
  """The hub models whose architecture is `description` (torch_layout.describe's)."""
  return [
      name for name, model in HUB_MODELS.items()
      if architecture(model, model['image_size']) == description
  ]
