"""The convolutional backbones: convnet_small's shapes and size, features independent of the rest of
the batch, the ResNets' shapes, and only the default feature (DINO's linear-evaluation options are
the ViT's)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kldino.models import ResNet, build_backbone
from kldino.models.convnet import CONVNET_SIZES
from tests.models.helpers import images, model_config, run
from tests.models.test_vit import _backbone, _images


def test_convnet_small_shapes_on_16_and_8_pixels_and_size():
  convnet = build_backbone(model_config(name='convnet_small'),
                           in_channels=1,
                           image_size=16,
                           rngs=nnx.Rngs(0))
  assert convnet.num_features == 128
  for size in (16, 8):
    features = run(convnet, images((3, size, size, 1)), jax.random.key(0))
    assert features.shape == (3, 128)
    assert np.all(np.isfinite(features))
  count = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(convnet, nnx.Param)))
  assert 0.4e6 < count < 0.8e6


def test_convnet_feature_does_not_depend_on_the_rest_of_the_batch():
  convnet = ResNet(in_channels=1,
                   drop_path_rate=0.1,
                   rngs=nnx.Rngs(0),
                   **CONVNET_SIZES['convnet_small'])
  x, others = images((3, 8, 8, 1)), images((3, 8, 8, 1), seed=1)
  mixed = jnp.concatenate([x[:1], 10.0 * others[1:]])
  np.testing.assert_allclose(run(convnet, mixed)[:1], run(convnet, x)[:1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(run(convnet, x, jax.random.key(3)), run(convnet, x), atol=1e-4)


@pytest.mark.parametrize('name, features', [('resnet18', 512), ('resnet50', 2048)])
def test_resnet_shapes(name, features):
  backbone = nnx.eval_shape(lambda: build_backbone(
      model_config(name=name), in_channels=3, image_size=224, rngs=nnx.Rngs(0)))
  assert backbone.num_features == features
  graphdef, params = nnx.split(backbone, nnx.Param)
  out = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p)(x), params,
                       jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert out.shape == (2, features)


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
