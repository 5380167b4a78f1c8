"""The ViT: its features for global, local and rectangular crops, the position embedding's bicubic
resize, attention against numpy, stochastic depth, the ViT-S/16 parameter count, the conv stem;
DINO's linear-evaluation features (last n normed CLS tokens, optional patch-token average) against
the PyTorch reference ViT, and their options' checks."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs.smoke import get_config as smoke_config
from kldino.modes import import_dino as convert_dino
from kldino.models import ViT, build_backbone, build_model, forward, validate_model_config
from kldino.core import step
from kldino.models.vit import Attention
from tests.helpers import tiny_config
from kldino.tools.torch_models import VisionTransformer
from tests.models.helpers import images, model_config, run
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


# DINOv2's options against tests/torch_dinov2.py: (ffn, LayerScale init, registers,
# interpolation offset, antialias); other resolutions than the table's grid exercise the resize.
DINOV2_OPTIONS = [
    ('swiglu', 0.5, 4, 0.1, False),  # the shape of DINOv2's ViT-g with registers
    ('mlp', 1e-5, 0, 0.1, False),  # DINOv2's ViT-S/B/L hub models
    ('mlp', 1.0, 4, 0.0, True),  # the _reg hub models: antialias, no offset
]
DINOV2_PATCH, DINOV2_IMAGE = 7, 28


def _dinov2_pair(ffn, layerscale, registers, offset, antialias):
  """The PyTorch DINOv2 ViT with random parameters and kldino's ViT holding the same ones."""
  from tests import torch_dinov2  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  reference = torch_dinov2.DinoVisionTransformer(img_size=DINOV2_IMAGE,
                                                 patch_size=DINOV2_PATCH,
                                                 in_chans=CHANNELS,
                                                 dim=32,
                                                 depth=2,
                                                 num_heads=2,
                                                 ffn=ffn,
                                                 init_values=layerscale,
                                                 num_register_tokens=registers,
                                                 interpolate_offset=offset,
                                                 interpolate_antialias=antialias).eval()
  config = model_config(name='vit_nano',
                        patch_size=DINOV2_PATCH,
                        ffn=ffn,
                        layerscale=layerscale,
                        num_registers=registers,
                        mask_token=True,
                        pos_interpolation='torch',
                        interpolate_offset=offset,
                        interpolate_antialias=antialias)
  return reference, _kldino_twin(reference, config, DINOV2_IMAGE, 0.05)


def _kldino_twin(reference, config, image_size, scale):
  """kldino's ViT of `config` holding `reference`'s parameters, after adding noise of `scale` to
  every one of them (away from its init: LayerScale's gains, a masked key bias)."""
  with torch.no_grad():
    for parameter in reference.parameters():
      parameter.add_(scale * torch.randn_like(parameter))
  backbone = build_backbone(config, in_channels=CHANNELS, image_size=image_size, rngs=nnx.Rngs(0))
  state = nnx.state(backbone, nnx.Param)
  state_dict = {key: value.detach().numpy() for key, value in reference.state_dict().items()}
  nnx.replace_by_pure_dict(state, convert_dino.convert(state_dict, nnx.to_pure_dict(state)))
  nnx.update(backbone, state)
  return backbone


@nnx.jit
def _tokens(backbone, x, masks):
  return backbone.tokens(x, masks=masks)


@pytest.mark.parametrize('options', DINOV2_OPTIONS)
@pytest.mark.parametrize('size', [DINOV2_IMAGE, 42, 14])
def test_dinov2_options_give_dinov2s_tokens(options, size):
  """CLS and patch tokens (registers left out) equal DINOv2's to 1e-5, at the table's grid, on a
  larger one and on a smaller one (the position table interpolated), with masked patches too."""
  reference, backbone = _dinov2_pair(*options)
  rng = np.random.default_rng(size)
  pixels = rng.standard_normal((3, size, size, CHANNELS)).astype(np.float32)
  masks = rng.random((3, (size // DINOV2_PATCH)**2)) < 0.4
  _assert_same_tokens(reference, backbone, pixels, masks, options[2], _max_abs_error)


def _assert_same_tokens(reference, backbone, pixels, masks, registers, error):
  """The transcription's and kldino's CLS and patch tokens, unmasked and with `masks`, within
  1e-5 by `error`, and the last block's CLS attention within 1e-5."""
  attention = None
  for mask in (None, masks):
    with torch.no_grad():
      expected = reference.forward_features(
          torch.from_numpy(pixels).permute(0, 3, 1, 2),
          None if mask is None else torch.from_numpy(mask))
    cls, patches = _tokens(backbone, jnp.asarray(pixels),
                           None if mask is None else jnp.asarray(mask))
    assert error(cls, expected['x_norm_clstoken'].numpy()) < 1e-5
    assert error(patches, expected['x_norm_patchtokens'].numpy()) < 1e-5
    attention = expected['last_attention'] if attention is None else attention
  np.testing.assert_allclose(np.asarray(backbone.cls_attention(jnp.asarray(pixels))),
                             attention[:, :, 0, 1 + registers:].numpy(),
                             atol=1e-5)


def test_dinov2_options_are_checked_and_drop_path_can_be_uniform():
  with pytest.raises(ValueError, match="unknown model.ffn 'geglu': choose one of mlp, swiglu"):
    validate_model_config(model_config(name='vit_nano', ffn='geglu'))
  with pytest.raises(ValueError, match='model.interpolate_offset=1.5 must be in'):
    validate_model_config(model_config(name='vit_nano', interpolate_offset=1.5))
  uniform = build_backbone(model_config(name='vit_micro', drop_path=0.3, drop_path_uniform=True),
                           in_channels=1,
                           image_size=16,
                           rngs=nnx.Rngs(0))
  assert [block.drop_rate for block in uniform.blocks] == [0.3] * 4
  with pytest.raises(ValueError, match='model.mask_token=True'):
    _backbone().tokens(jnp.zeros((1, IMAGE, IMAGE, CHANNELS)), masks=jnp.ones((1, 16), bool))


# DINOv3's options against tests/torch_dinov3.py: (feed-forward, its ratio, storage tokens,
# masked key bias, coordinate normalisation); LayerScale and LayerNorm eps 1e-5 throughout.
DINOV3_OPTIONS = [
    ('mlp', 4.0, 4, True, 'separate'),  # the shape of DINOv3's ViT-S/B/L hub models
    ('swiglu', 6.0, 4, True, 'separate'),  # ViT-S+: the unfused SwiGLU, ratio 6
    ('mlp', 4.0, 0, False, 'max'),
]
DINOV3_PATCH = 4


def _dinov3_pair(ffn, mlp_ratio, registers, mask_k_bias, normalize):
  """The PyTorch DINOv3 ViT with random parameters and kldino's ViT holding the same ones."""
  from tests import torch_dinov3  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  reference = torch_dinov3.DinoVisionTransformer(patch_size=DINOV3_PATCH,
                                                 in_chans=CHANNELS,
                                                 embed_dim=32,
                                                 depth=2,
                                                 num_heads=2,
                                                 ffn_ratio=mlp_ratio,
                                                 ffn_layer=ffn,
                                                 layerscale_init=0.5,
                                                 n_storage_tokens=registers,
                                                 mask_k_bias=mask_k_bias,
                                                 pos_embed_rope_normalize_coords=normalize).eval()
  config = model_config(name='vit_nano',
                        patch_size=DINOV3_PATCH,
                        ffn=ffn,
                        mlp_ratio=mlp_ratio,
                        layerscale=0.5,
                        num_registers=registers,
                        mask_token=True,
                        pos_embed='rope',
                        rope_normalize_coords=normalize,
                        rope_rescale_coords=2.0,
                        mask_k_bias=mask_k_bias,
                        norm_eps=1e-5)
  backbone = _kldino_twin(reference, config, 16, 0.3)
  assert backbone.pos_embed is None
  return reference, backbone


@pytest.mark.parametrize('options', DINOV3_OPTIONS)
@pytest.mark.parametrize('height, width', [(16, 16), (24, 16), (12, 32)])
def test_dinov3_options_give_dinov3s_tokens(options, height, width):
  """CLS and patch tokens (storage tokens left out) equal DINOv3's to 1e-5 relative on square and
  rectangular grids (RoPE: no table to resize), with masked patches too, and the last CLS
  attention."""
  reference, backbone = _dinov3_pair(*options)
  rng = np.random.default_rng(height * width)
  pixels = rng.standard_normal((3, height, width, CHANNELS)).astype(np.float32)
  masks = rng.random((3, height * width // DINOV3_PATCH**2)) < 0.4
  _assert_same_tokens(reference, backbone, pixels, masks, options[2], _relative_error)


def _relative_error(actual, expected) -> float:
  """The largest deviation over the largest magnitude (the normed tokens reach ~3)."""
  return _max_abs_error(actual, expected) / float(np.max(np.abs(expected)))


def test_rope_augmentations_act_in_training_only_and_differ_per_key():
  _, backbone = _dinov3_pair(*DINOV3_OPTIONS[0])
  x = images((2, 16, 16, CHANNELS))
  assert np.array_equal(run(backbone, x), run(backbone, x))
  trained = [np.asarray(run(backbone, x, jax.random.key(seed))) for seed in (0, 1)]
  assert not np.allclose(trained[0], trained[1], atol=1e-4)


@pytest.mark.parametrize('key, value, message', [
    ('pos_embed', 'sincos', "unknown model.pos_embed 'sincos': choose one of learned, rope"),
    ('rope_normalize_coords', 'mean',
     "unknown model.rope_normalize_coords 'mean': choose one of min, max, separate"),
    ('rope_rescale_coords', 0.5, r'model.rope_rescale_coords=0.5 must be 0 \(off\) or >= 1'),
    ('rope_shift_coords', -1.0, r'model.rope_shift_coords=-1.0 must be >= 0'),
    ('norm_eps', 0.0, 'model.norm_eps=0.0 must be > 0'),
])
def test_dinov3_options_are_checked(key, value, message):
  with pytest.raises(ValueError, match=message):
    validate_model_config(model_config(name='vit_nano', **{key: value}))
