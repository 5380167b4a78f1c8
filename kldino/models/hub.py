"""The published ViT backbones kldino imports by name, each as its official hub entry builds it
(facebookresearch/dino hubconf.py; dinov2/hub/backbones.py): the `config.model` options and the
image size of its position table. configs/pretrained.py makes a config of each; the import names
the one whose architecture a state dict holds (kldino/modes/import_dino.py).
"""
from __future__ import annotations

from kldino.models.vit import VIT_SIZES


def _dino(name: str, patch_size: int) -> dict:
  # DINO resizes the position table by the scale factor (grid + 0.1) / trained grid.
  return dict(name=name,
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
  return dict(name=name,
              patch_size=14,
              image_size=518,
              layerscale=1.0,
              ffn='swiglu' if name == 'vit_giant2' else 'mlp',
              num_registers=4 if registers else 0,
              mask_token=True,
              pos_interpolation='torch',
              interpolate_offset=0.0 if registers else 0.1,
              interpolate_antialias=registers)


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
}


def architecture(model, image_size: int) -> dict:
  """What a ViT's options (`config.model`, or a HUB_MODELS entry) build, as torch_layout.describe
  reads it from a state dict."""
  size = VIT_SIZES.get(model['name'], {})
  return {
      'dim': size.get('dim'),
      'depth': size.get('depth', 0),
      'patch_size': model['patch_size'],
      'grid': image_size // model['patch_size'],
      'num_registers': model['num_registers'],
      'layerscale': bool(model['layerscale']),
      'ffn': model['ffn'],
      'mask_token': bool(model['mask_token']),
  }


def matching(description: dict) -> list[str]:
  """The hub models whose architecture is `description` (torch_layout.describe's)."""
  return [
      name for name, model in HUB_MODELS.items()
      if architecture(model, model['image_size']) == description
  ]
