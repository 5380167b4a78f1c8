"""DINO's linear-evaluation features (last n normed CLS tokens, optional patch-token average)
against the PyTorch reference ViT, and their options' checks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs.smoke import get_config as smoke_config
from kldino.modes import import_dino as convert_dino
from kldino.models import forward
from kldino.core import step
from kldino.models.registry import build_backbone
from tests.helpers import tiny_config
from kldino.tools.torch_baseline import VisionTransformer
from tests.torch_vit import linear_eval_features

IMAGE, PATCH, DIM, DEPTH, HEADS, CHANNELS = 16, 4, 32, 2, 2, 1  # vit_nano, as configs/smoke.py
OPTIONS = [(1, False), (2, False), (1, True)]  # n_last_blocks = 2 is the depth


@pytest.fixture(scope='module')
def torch_vit():
  torch.manual_seed(0)
  model = VisionTransformer(IMAGE, PATCH, CHANNELS, DIM, DEPTH, HEADS).eval()
  with torch.no_grad():  # every tensor random and O(1), so that a misplaced one shows
    for parameter in model.parameters():
      parameter.copy_(torch.randn_like(parameter) * 0.3)
  return model


@pytest.fixture(scope='module')
def backbone_params(torch_vit):
  """The PyTorch weights as a kldino vit_nano backbone's pure parameter dict."""
  template = _backbone()
  state_dict = {key: value.numpy() for key, value in torch_vit.state_dict().items()}
  return convert_dino.convert(state_dict, nnx.to_pure_dict(nnx.state(template, nnx.Param)))


@pytest.fixture(scope='module')
def vit(backbone_params):
  backbone = _backbone()
  state = nnx.state(backbone, nnx.Param)
  nnx.replace_by_pure_dict(state, backbone_params)
  nnx.update(backbone, state)
  return backbone


def _backbone(name='vit_nano'):
  config = smoke_config().model
  config.name = name
  return build_backbone(config, in_channels=CHANNELS, image_size=IMAGE, rngs=nnx.Rngs(0))


def _images(seed=1, count=5):
  return np.random.default_rng(seed).standard_normal(
      (count, IMAGE, IMAGE, CHANNELS)).astype(np.float32)


def _torch_features(model, images_nhwc, n_last_blocks, avgpool):
  with torch.no_grad():
    return linear_eval_features(model,
                                torch.from_numpy(images_nhwc).permute(0, 3, 1, 2), n_last_blocks,
                                avgpool).numpy()


def _max_abs_error(actual, expected):
  return float(np.max(np.abs(np.asarray(actual) - expected)))


@pytest.mark.parametrize('n_last_blocks, avgpool', OPTIONS)
def test_features_equal_dino_linear_eval_features(torch_vit, vit, n_last_blocks, avgpool):
  images = _images()
  expected = _torch_features(torch_vit, images, n_last_blocks, avgpool)
  features = vit.features(jnp.asarray(images),
                          n_last_blocks=n_last_blocks,
                          avgpool_patchtokens=avgpool)
  assert features.shape == (5, vit.feature_dim(n_last_blocks, avgpool)) == expected.shape
  assert _max_abs_error(features, expected) < 1e-5


def test_reference_layout_cls_blocks_in_order_and_interleaved_average(torch_vit):
  """The reference's own layout, from its intermediate layers: a check of the test's formula."""
  images = torch.from_numpy(_images()).permute(0, 3, 1, 2)
  with torch.no_grad():
    first, last = torch_vit.get_intermediate_layers(images, 2)
    np.testing.assert_array_equal(torch_vit(images).numpy(), last[:, 0].numpy())
    two = linear_eval_features(torch_vit, images, 2).numpy()
    pooled = linear_eval_features(torch_vit, images, 1, True).numpy()
  np.testing.assert_array_equal(two[:, :DIM], first[:, 0].numpy())
  np.testing.assert_array_equal(two[:, DIM:], last[:, 0].numpy())
  np.testing.assert_array_equal(pooled[:, 0::2], last[:, 0].numpy())
  np.testing.assert_allclose(pooled[:, 1::2], last[:, 1:].mean(dim=1).numpy(), rtol=1e-6)


def test_one_block_without_average_is_the_call_feature(vit):
  images = jnp.asarray(_images(seed=2))
  np.testing.assert_array_equal(np.asarray(vit.features(images)), np.asarray(vit(images)))


def test_feature_dim():
  vit = nnx.eval_shape(_backbone)
  assert vit.feature_dim() == DIM
  assert vit.feature_dim(2, False) == 2 * DIM
  assert vit.feature_dim(1, True) == 2 * DIM


@pytest.mark.parametrize('n_last_blocks, avgpool, key', [
    (0, False, 'eval.n_last_blocks'),
    (DEPTH + 1, False, 'eval.n_last_blocks'),
    (2, True, 'eval.avgpool_patchtokens'),
])
def test_bad_options_name_the_config_key(n_last_blocks, avgpool, key):
  vit = nnx.eval_shape(_backbone)
  with pytest.raises(ValueError, match=key):
    vit.feature_dim(n_last_blocks, avgpool)
  with pytest.raises(ValueError, match=key):
    vit.features(jnp.zeros((1, IMAGE, IMAGE, CHANNELS)),
                 n_last_blocks=n_last_blocks,
                 avgpool_patchtokens=avgpool)


def test_convnet_has_only_the_default_feature():
  convnet = _backbone('convnet_small')
  images = jnp.asarray(_images(count=2)[:, :8, :8])
  np.testing.assert_array_equal(np.asarray(convnet.features(images)), np.asarray(convnet(images)))
  assert convnet.feature_dim() == convnet.num_features
  for n_last_blocks, avgpool in ((2, False), (1, True)):
    with pytest.raises(ValueError, match='apply to ViTs only: model convnet_small'):
      convnet.features(images, n_last_blocks=n_last_blocks, avgpool_patchtokens=avgpool)
    with pytest.raises(ValueError, match='eval.n_last_blocks'):
      convnet.feature_dim(n_last_blocks, avgpool)


@pytest.mark.parametrize('n_last_blocks, avgpool', OPTIONS)
def test_forward_backbone_features_on_pure_params(torch_vit, backbone_params, n_last_blocks,
                                                  avgpool):
  graphdef, abstract = step.build_graphdef(tiny_config(), in_channels=CHANNELS)
  params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), abstract)
  params['backbone'] = jax.tree.map(jnp.asarray, backbone_params)
  images = _images(seed=3)
  compute = jax.jit(
      functools.partial(forward.backbone_features,
                        graphdef,
                        n_last_blocks=n_last_blocks,
                        avgpool_patchtokens=avgpool))
  features = compute(params, jnp.asarray(images))
  assert features.dtype == jnp.float32
  expected = _torch_features(torch_vit, images, n_last_blocks, avgpool)
  assert _max_abs_error(features, expected) < 1e-5


def test_forward_backbone_features_in_bfloat16_are_float32(backbone_params):
  graphdef, abstract = step.build_graphdef(tiny_config(compute_dtype='bfloat16'),
                                           in_channels=CHANNELS)
  params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), abstract)
  params['backbone'] = jax.tree.map(jnp.asarray, backbone_params)
  features = forward.backbone_features(graphdef, params, jnp.asarray(_images()), n_last_blocks=2)
  assert features.dtype == jnp.float32 and features.shape == (5, 2 * DIM)
