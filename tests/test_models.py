"""Backbones and the registry: shapes, attention and position embeddings against numpy, stochastic
depth, batch independence, parameter counts."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kldino.models import (BACKBONES, DINOModel, ResNet, ViT, build_backbone, build_model,
                           register_backbone, validate_model_config)
from kldino.config.defaults import base_config
from kldino.models.convnet import CONVNET_SIZES
from kldino.models.layers import drop_path, gelu
from kldino.models.vit import Attention


def micro_vit(drop_path_rate=0.0, seed=0):
  # Tests share these widths (32 -> 96, 32, 128, 8, 16): each new shape costs a compile.
  return ViT(patch_size=4,
             dim=32,
             depth=3,
             num_heads=4,
             drop_path_rate=drop_path_rate,
             in_channels=1,
             image_size=16,
             rngs=nnx.Rngs(seed))


def model_config(**overrides):
  config = base_config().model
  config.update(name='convnet_small', num_prototypes=16, head_hidden_dim=32, head_bottleneck_dim=8)
  config.update(overrides)
  return config


@nnx.jit
def run(backbone, x, key=None):
  """One compile per model and shape, far cheaper on CPU than compiling each op eagerly."""
  return backbone(x, drop_key=key)


def images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ---------------------------------------------------------------------------------------- ViT


def test_vit_feature_shape_for_global_local_and_rectangular_crops():
  vit = micro_vit()
  assert vit.num_features == 32
  for height, width in ((16, 16), (8, 8), (16, 8)):
    features = run(vit, images((3, height, width, 1)))
    assert features.shape == (3, 32)
    assert np.all(np.isfinite(features))


def test_vit_rejects_sizes_not_divisible_by_patch():
  with pytest.raises(ValueError, match='multiple of patch_size=4'):
    micro_vit()(images((2, 10, 16, 1)))
  with pytest.raises(ValueError, match='multiple of patch_size=4'):
    ViT(patch_size=4, dim=32, depth=1, num_heads=4, in_channels=1, image_size=18, rngs=nnx.Rngs(0))


def keys_cubic(distance):
  """Keys' cubic convolution kernel with a = -0.5."""
  d = np.abs(distance)
  near = (1.5 * d - 2.5) * d * d + 1
  far = ((-0.5 * d + 2.5) * d - 4) * d + 2
  return np.where(d < 1, near, np.where(d < 2, far, 0.0))


def cubic_resize_matrix(in_size, out_size):
  """[out, in] weights: half-pixel centres, taps outside the input dropped, rows renormalised."""
  centres = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
  weights = keys_cubic(centres[:, None] - np.arange(in_size)[None, :])
  return weights / weights.sum(axis=1, keepdims=True)


def test_position_embedding_is_the_table_at_its_grid_and_bicubic_elsewhere():
  vit = micro_vit()
  table = np.asarray(vit.pos_embed[...])
  np.testing.assert_array_equal(vit.position_embedding(4, 4), table)
  grid = table[0, 1:].reshape(4, 4, -1)
  for height, width in ((2, 2), (6, 6), (2, 6)):
    resized = vit.position_embedding(height, width)
    assert resized.shape == (1, 1 + height * width, 32)
    np.testing.assert_array_equal(resized[:, 0], table[:, 0])  # CLS position kept
    expected = np.einsum('hi,wj,ijd->hwd', cubic_resize_matrix(4, height),
                         cubic_resize_matrix(4, width), grid)
    np.testing.assert_allclose(resized[0, 1:], expected.reshape(-1, 32), atol=1e-6)


def numpy_attention(tokens, qkv_kernel, qkv_bias, proj_kernel, proj_bias, num_heads):
  batch, length, dim = tokens.shape
  head_dim = dim // num_heads
  qkv = (tokens @ qkv_kernel + qkv_bias).reshape(batch, length, 3, num_heads, head_dim)
  q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, heads, T, head_dim]
  scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
  scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
  weights = scores / scores.sum(axis=-1, keepdims=True)
  mixed = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, dim)
  return mixed @ proj_kernel + proj_bias


def test_attention_matches_numpy_multi_head_attention():
  attention = Attention(32, 4, rngs=nnx.Rngs(1))
  # Bigger than the .02 init, so that the softmax is far from uniform and the test can fail.
  for linear, seed in ((attention.qkv, 2), (attention.proj, 3)):
    linear.kernel[...] = images(linear.kernel.shape, seed) * 0.3
    linear.bias[...] = images(linear.bias.shape, seed + 10) * 0.3
  tokens = images((2, 5, 32), 4)
  expected = numpy_attention(np.asarray(tokens, np.float64),
                             *(np.asarray(p[...], np.float64)
                               for p in (attention.qkv.kernel, attention.qkv.bias,
                                         attention.proj.kernel, attention.proj.bias)),
                             num_heads=4)
  np.testing.assert_allclose(attention(tokens), expected, rtol=1e-4, atol=1e-5)


def test_drop_path_is_off_without_key_and_random_with_one():
  plain, dropping = micro_vit(0.0), micro_vit(0.5)  # same seed: same weights
  assert [block.drop_rate for block in dropping.blocks] == [0.0, 0.25, 0.5]
  x = images((8, 16, 16, 1))
  deterministic = run(plain, x)
  np.testing.assert_allclose(run(dropping, x), deterministic, rtol=1e-6, atol=1e-6)
  key_a, key_b = jax.random.key(1), jax.random.key(2)
  dropped = run(dropping, x, key_a)
  np.testing.assert_array_equal(dropped, run(dropping, x, key_a))
  assert not np.allclose(dropped, deterministic, atol=1e-4)
  assert not np.allclose(dropped, run(dropping, x, key_b), atol=1e-4)


def test_gelu_is_exact_gelu_with_its_derivative():
  """x * Phi(x) and its derivative Phi(x) + x * phi(x), from math.erf in float64."""
  x = np.concatenate([np.linspace(-12.0, 12.0, 4801), [-5.3, -0.7071, 0.0, 0.3, 2.9]])
  phi_cdf = np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
  phi_pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
  values, pullback = jax.vjp(gelu, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(values, x * phi_cdf, rtol=2e-6, atol=1e-6)
  np.testing.assert_allclose(pullback(jnp.ones(len(x), jnp.float32))[0],
                             phi_cdf + x * phi_pdf,
                             rtol=1e-5,
                             atol=2e-6)
  # DINO's nn.GELU is the exact form, not the tanh one, which differs by up to ~5e-4 here.
  assert np.max(np.abs(np.asarray(values) - np.asarray(jax.nn.gelu(x, approximate=True)))) > 1e-4


def test_drop_path_drops_whole_samples_and_preserves_the_mean():
  branch = jnp.ones((20000, 3, 2))
  out = np.asarray(drop_path(branch, 0.3, jax.random.key(0)))
  per_sample = out.reshape(len(out), -1)
  assert np.all(per_sample == per_sample[:, :1])  # one draw per sample
  assert set(np.unique(out)) <= {0.0, np.float32(1 / 0.7)}
  kept = np.mean(per_sample[:, 0] > 0)
  assert abs(kept - 0.7) < 4 * math.sqrt(0.7 * 0.3 / len(out))
  assert abs(out.mean() - 1.0) < 0.03
  np.testing.assert_array_equal(drop_path(branch, 0.3, None), branch)


def test_vit_small_16_parameter_count_without_allocating():
  vit = nnx.eval_shape(lambda: build_backbone(model_config(name='vit_small', patch_size=16),
                                              in_channels=3,
                                              image_size=224,
                                              rngs=nnx.Rngs(0)))
  dim, depth, patch, tokens = 384, 12, 16, (224 // 16)**2 + 1
  block = (2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * 4 * dim + 4 * dim) +
           (4 * dim * dim + dim))
  expected = (patch * patch * 3 * dim + dim) + dim + tokens * dim + depth * block + 2 * dim
  count = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(vit, nnx.Param)))
  assert count == expected
  assert 21.6e6 < count < 21.8e6


# ------------------------------------------------------------------------------- convolutional


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


# ------------------------------------------------------------------------------------ registry


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


def test_conv_stem_gives_the_patch_grid_and_refuses_other_patch_sizes():
  config = model_config(name='vit_nano', stem='conv', patch_size=4)
  model = build_model(config, in_channels=1, image_size=16, rngs=nnx.Rngs(0))
  tokens = model.backbone.patch_embed(jnp.ones((2, 16, 16, 1)))
  assert tokens.shape == (2, 4, 4, model.backbone.num_features)
  assert run(model.backbone, jnp.ones((2, 8, 8, 1))).shape == (2, model.backbone.num_features)
  with pytest.raises(ValueError, match='power-of-two patch_size'):
    build_model(model_config(name='vit_nano', stem='conv', patch_size=3),
                in_channels=1,
                image_size=12,
                rngs=nnx.Rngs(0))


@pytest.mark.parametrize('name', ['vit_nano', 'convnet_small'])
def test_remat_gives_the_same_features_and_gradients(name):
  from kldino.models import forward
  from kldino.core import step as step_lib  # pylint: disable=g-import-not-at-top
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(name=name)
  plain, params = step_lib.build_graphdef(config, 1)
  rematted, _ = step_lib.build_graphdef(tiny_config(name=name, remat=True), 1)
  params = jax.tree.map(
      lambda leaf: jax.random.normal(jax.random.PRNGKey(leaf.size), leaf.shape) * 0.1, params)
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 1))

  def loss(graphdef, p):
    return jnp.sum(forward.backbone_features(graphdef, p, images)**2)

  np.testing.assert_allclose(loss(rematted, params), loss(plain, params), rtol=1e-6)
  grads = [jax.grad(lambda p, g=g: loss(g, p))(params) for g in (plain, rematted)]
  for a, b in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
