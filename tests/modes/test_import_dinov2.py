"""Importing DINOv2's hub backbones: a random-filled state dict with the official keys and shapes
(dinov2_vits14_reg: registers, LayerScale, antialiased resizing) imported with its named config
gives the features of tests/torch_dinov2.py's DINOv2 transcription at 224 and 448 px."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import imagenet_vit_s16
from configs import pretrained
from kldino.errors import ConfigError
from kldino.models import hub
from kldino.models import torch_layout
from kldino.modes import import_dino as import_mode
from tests import torch_dinov2
from tests.modes.hub_imports import (assert_export_gives_back, import_reference, randomise,
                                     relative_error)

NAME = 'dinov2_vits14_reg'


def _reference(name: str = NAME, seed: int = 0):
  """The hub model `name` (a ViT-S) with every tensor random, as DINOv2 builds it."""
  model = hub.HUB_MODELS[name]
  reference = torch_dinov2.DinoVisionTransformer(
      img_size=model['image_size'],
      patch_size=14,
      in_chans=3,
      dim=384,
      depth=12,
      num_heads=6,
      ffn=model['ffn'],
      init_values=model['layerscale'],
      num_register_tokens=model['num_registers'],
      interpolate_offset=model['interpolate_offset'],
      interpolate_antialias=model['interpolate_antialias']).eval()
  return randomise(reference, seed)


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  return import_reference(_reference(), NAME, 'dinov2_vits14_reg4_pretrain.pth', tmp_path_factory)


@pytest.mark.parametrize('size', [224, 448])
def test_imported_features_equal_the_official_models(imported, size):
  """CLS, patch tokens (registers left out) and DINOv2's 4-last-blocks linear feature."""
  reference, backbone, _, _ = imported
  images = np.random.default_rng(size).standard_normal((2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    expected = reference.forward_features(nchw)
    layers = reference.get_intermediate_layers(nchw, n=4)
  cls, patches = backbone.tokens(jnp.asarray(images))
  assert relative_error(np.asarray(cls), expected['x_norm_clstoken'].numpy()) < 1e-5
  assert relative_error(np.asarray(patches), expected['x_norm_patchtokens'].numpy()) < 1e-5
  four_blocks = np.asarray(backbone.features(jnp.asarray(images), n_last_blocks=4))
  expected_four = torch.cat([cls_token for _, cls_token in layers], dim=-1).numpy()
  assert relative_error(four_blocks, expected_four) < 1e-5


def test_a_config_of_another_architecture_names_the_hub_config(imported, tmp_path):
  _, _, path, _ = imported
  with pytest.raises(ConfigError,
                     match=r'patch_size 14 \(config: 16\).*'
                     r'configs/pretrained.py:dinov2_vits14_reg$'):
    import_mode.run(imagenet_vit_s16.get_config(), str(tmp_path / 'run'), import_from=path)


def test_each_hub_name_builds_its_architecture_and_names_it_alone():
  for name, model in hub.HUB_MODELS.items():
    config = pretrained.get_config(name)
    described = hub.architecture(config.model, config.aug.global_size)
    assert hub.matching(described) == [name]
    assert config.aug.local_size % config.model.patch_size == 0
  assert torch_layout.describe(_reference('dinov2_vits14').state_dict()) == hub.architecture(
      hub.HUB_MODELS['dinov2_vits14'], 518)
  with pytest.raises(ValueError, match="':NAME' with NAME in dino_vits16"):
    pretrained.get_config('dinov2_vith14')


def test_export_pth_gives_back_the_official_state_dict(imported, tmp_path):
  """--format=pth of the imported run: DINOv2's layout, loaded with strict=True, every tensor
  the one imported."""
  _, _, path, workdir = imported
  assert_export_gives_back(NAME, path, workdir, _reference(seed=1), str(tmp_path / 'teacher.pth'))
