"""Importing DINOv3's hub backbones: a random-filled state dict with the official keys, shapes and
buffers (dinov3_vits16: RoPE, storage tokens, LayerScale, the masked key bias, LayerNorm eps
1e-5) imported with its named config gives the features of tests/torch_dinov3.py's DINOv3
transcription at 224 and 512 px, and exports back to the same tensors."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs import imagenet_vit_s16
from configs import pretrained
from kldino.errors import ConfigError
from kldino.models import hub
from kldino.models import torch_layout
from kldino.models.registry import build_backbone
from kldino.modes import import_dino as import_mode
from tests import torch_dinov3
from tests.modes.hub_imports import (assert_export_gives_back, import_reference, randomise,
                                     relative_error)
from tests.helpers import tiny_config

NAME = 'dinov3_vits16'


def _reference(name: str = NAME, seed: int = 0):
  """The hub model `name` (a ViT-S) with every tensor random, as dinov3/hub/backbones.py builds
  it."""
  model = hub.HUB_MODELS[name]
  return randomise(
      torch_dinov3.DinoVisionTransformer(patch_size=16,
                                         embed_dim=384,
                                         depth=12,
                                         num_heads=6,
                                         ffn_ratio=model['mlp_ratio'],
                                         ffn_layer=model['ffn'],
                                         layerscale_init=model['layerscale'],
                                         n_storage_tokens=model['num_registers'],
                                         mask_k_bias=model['mask_k_bias'],
                                         norm_layer='layernormbf16').eval(), seed)


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """The random ViT-S/16 (buffers as DINOv3 initialises them) imported with its named config."""
  return import_reference(_reference(), NAME, 'dinov3_vits16_pretrain_lvd1689m.pth',
                          tmp_path_factory)


@nnx.jit
def _tokens(backbone, images):
  return backbone.tokens(images)


@nnx.jit
def _four_blocks(backbone, images):
  return backbone.features(images, n_last_blocks=4)


@pytest.mark.parametrize('size', [224, 512])
def test_imported_features_equal_the_official_models(imported, size):
  """CLS and patch tokens (storage tokens left out); at 224 px DINO's 4-last-blocks feature."""
  reference, backbone, _, _ = imported
  images = np.random.default_rng(size).standard_normal((2, size, size, 3)).astype(np.float32)
  nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
  with torch.no_grad():
    expected = reference.forward_features(nchw)
  cls, patches = _tokens(backbone, jnp.asarray(images))
  assert relative_error(np.asarray(cls), expected['x_norm_clstoken'].numpy()) < 1e-5
  assert relative_error(np.asarray(patches), expected['x_norm_patchtokens'].numpy()) < 1e-5
  if size != 224:
    return
  with torch.no_grad():
    layers = reference.get_intermediate_layers(nchw, n=4)
  expected_four = torch.cat([cls_token for _, cls_token in layers], dim=-1).numpy()
  assert relative_error(np.asarray(_four_blocks(backbone, jnp.asarray(images))),
                        expected_four) < 1e-5


def test_a_config_of_another_architecture_names_the_hub_config(imported, tmp_path):
  _, _, path, _ = imported
  with pytest.raises(ConfigError,
                     match=r"grid 0 \(config: 14\).*pos_embed rope \(config: learned\).*"
                     r'configs/pretrained.py:dinov3_vits16$'):
    import_mode.run(imagenet_vit_s16.get_config(), str(tmp_path / 'run'), import_from=path)
  with pytest.raises(ConfigError,
                     match=r'ffn swiglu \(config: mlp\); pass '
                     r'--config=configs/pretrained.py:dinov3_vits16plus$'):
    import_mode.check_architecture(
        _reference('dinov3_vits16plus').state_dict(), pretrained.get_config(NAME), 'plus.pth')


def test_each_dinov3_hub_file_is_described_as_its_config_alone():
  for name in ('dinov3_vits16', 'dinov3_vits16plus'):
    state = {key: value.numpy() for key, value in _reference(name).state_dict().items()}
    config = pretrained.get_config(name)
    assert torch_layout.describe(state) == hub.architecture(config.model, config.aug.global_size)
    assert hub.matching(torch_layout.describe(state)) == [name]
  config = pretrained.get_config('dinov3_vitl16')
  assert (config.model.pos_embed, config.aug.global_size, config.aug.local_size) == ('rope', 224,
                                                                                     96)


def test_export_pth_gives_back_the_official_state_dict(imported, tmp_path):
  """--format=pth of the imported run: DINOv3's layout, loaded with strict=True, every tensor
  the one imported, buffers included."""
  _, _, path, workdir = imported
  assert_export_gives_back(NAME, path, workdir, _reference(seed=1), str(tmp_path / 'teacher.pth'))


def _tiny_pair(bias_mask_fill: float):
  """A small DINOv3 ViT whose qkv bias_mask holds `bias_mask_fill` everywhere, and a kldino one."""
  reference = randomise(
      torch_dinov3.DinoVisionTransformer(patch_size=4, embed_dim=32, depth=2, num_heads=2), 0)
  for block in reference.blocks:
    block.attn.qkv.bias_mask.fill_(bias_mask_fill)
  config = tiny_config(
      **{
          key: value
          for key, value in hub.HUB_MODELS[NAME].items()
          if key not in ('name', 'patch_size', 'image_size')
      })
  backbone = build_backbone(config.model, in_channels=3, image_size=16, rngs=nnx.Rngs(0))
  state = nnx.state(backbone, nnx.Param)
  state_dict = {key: value.numpy() for key, value in reference.state_dict().items()}
  nnx.replace_by_pure_dict(state, import_mode.convert(state_dict, nnx.to_pure_dict(state)))
  nnx.update(backbone, state)
  return reference, backbone


def test_a_zero_bias_mask_as_the_published_files_hold_is_folded_into_the_bias():
  """The published files hold bias_mask = 0 everywhere (dinov3 issue #195), so DINOv3's forward
  adds no qkv bias at all: the import folds the mask into the q and v thirds."""
  reference, backbone = _tiny_pair(0.0)
  images = np.random.default_rng(0).standard_normal((2, 16, 24, 3)).astype(np.float32)
  with torch.no_grad():
    expected = reference.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2))
  cls, patches = backbone.tokens(jnp.asarray(images))
  assert relative_error(np.asarray(cls), expected['x_norm_clstoken'].numpy()) < 1e-5
  assert relative_error(np.asarray(patches), expected['x_norm_patchtokens'].numpy()) < 1e-5
  with pytest.raises(ValueError, match='blocks.0.attn.qkv.bias_mask is not a key-bias mask'):
    _tiny_pair(float('nan'))
