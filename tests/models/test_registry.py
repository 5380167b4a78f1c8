"""The model registry (kldino/models/registry.py): backbone names, the model config's checks, and
build_model's DINOModel of parameters only."""
import jax
import pytest
from flax import nnx

from kldino.models import (BACKBONES, DINOModel, build_backbone, build_model, register_backbone,
                           validate_model_config)
from tests.models.helpers import images, model_config


def test_registry_names_and_unknown_name():
  assert {
      'vit_micro', 'vit_tiny', 'vit_small', 'vit_base', 'vit_large', 'convnet_small', 'resnet18',
      'resnet50'
  } <= set(BACKBONES)
  with pytest.raises(ValueError, match="unknown model.name 'nope': choose one of .*vit_small"):
    build_backbone(model_config(name='nope'), in_channels=1, image_size=16, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='registered twice'):
    register_backbone('vit_small')(lambda **kwargs: None)


@pytest.mark.parametrize('overrides, message', [
    (dict(name='nope'), "unknown model.name 'nope'"),
    (dict(num_prototypes=1), 'num_prototypes=1 must be >= 2'),
    (dict(head_norm='group'), "unknown model.head_norm 'group'"),
    (dict(prototypes='random'), "unknown model.prototypes 'random'"),
    (dict(drop_path=1.0), 'drop_path=1.0'),
])
def test_validate_model_config_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    validate_model_config(model_config(**overrides))


def test_validate_model_config_checks_patch_size_only_for_vits():
  validate_model_config(model_config(name='vit_micro'), image_sizes=(16, 8))
  with pytest.raises(ValueError, match='image size 6 is not a multiple of model.patch_size=4'):
    validate_model_config(model_config(name='vit_micro'), image_sizes=(16, 6))
  validate_model_config(model_config(), image_sizes=(16, 6))


def test_build_model_holds_only_params_and_runs_under_jit():
  config = model_config()
  model = build_model(config, in_channels=1, image_size=16, rngs=nnx.Rngs(0))
  assert isinstance(model, DINOModel)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert not jax.tree.leaves(rest)  # the train step keeps nothing but nnx.Param
  params = nnx.to_pure_dict(params)
  assert params['head']['prototypes'].shape == (8, 16)

  @jax.jit
  def logits(params, x, key):
    model = nnx.merge(graphdef, params)
    return model.head.logits(model.head.embed(model.backbone(x, drop_key=key)))

  assert logits(params, images((4, 8, 8, 1)), jax.random.key(0)).shape == (4, 16)
