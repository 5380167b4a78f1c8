"""kldino/models/torch_layout.py: kldino's ViT parameters in the official PyTorch layouts. A
DINOv2-style ViT exported from kldino loads into tests/torch_dinov2.py's transcription with
strict=True and gives kldino's features, a RoPE one into tests/torch_dinov3.py's; a plain one
into DINO's layout (kldino/tools/torch_models.py's VisionTransformer, DINO's names); each
converts back to the same parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from kldino.models import torch_layout
from kldino.models.registry import build_backbone
from kldino.modes import import_dino
from kldino.tools.torch_models import VisionTransformer
from tests import torch_dinov2
from tests import torch_dinov3
from tests.helpers import tiny_config


def _backbone(**model_options):
  config = tiny_config(**model_options)
  backbone = build_backbone(config.model, in_channels=3, image_size=16, rngs=nnx.Rngs(7))
  state = nnx.state(backbone, nnx.Param)
  params = nnx.to_pure_dict(state)
  # Every tensor random (LayerScale and the registers start near 0), so that none misplaced hides.
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(0)
  params = treedef.unflatten([
      (0.3 * rng.standard_normal(np.shape(leaf))).astype(np.float32) for leaf in leaves
  ])
  nnx.replace_by_pure_dict(state, params)
  nnx.update(backbone, state)
  return config, backbone, params


@pytest.mark.parametrize('options', [
    dict(layerscale=0.5,
         ffn='swiglu',
         num_registers=2,
         pos_interpolation='torch',
         interpolate_offset=0.1),
    dict(layerscale=0.5, ffn='mlp', num_registers=0, mask_token=False),
])
def test_a_dinov2_style_vit_loads_strictly_into_dinov2s_layout(options):
  config, backbone, params = _backbone(**options)
  assert torch_layout.layout_family(config.model) == 'dinov2'
  state = torch_layout.to_official(params, config.model)
  reference = torch_dinov2.DinoVisionTransformer(img_size=16,
                                                 patch_size=4,
                                                 in_chans=3,
                                                 dim=32,
                                                 depth=2,
                                                 num_heads=2,
                                                 ffn=options['ffn'],
                                                 init_values=0.5,
                                                 num_register_tokens=options['num_registers'],
                                                 interpolate_offset=0.1).eval()
  _assert_loads_with_the_same_tokens(reference, state, backbone, (3, 16, 16, 3))
  if not options.get('mask_token', True):  # DINOv2's model always holds one: zeros
    np.testing.assert_array_equal(state['mask_token'], np.zeros((1, 32)))


def _assert_loads_with_the_same_tokens(reference, state, backbone, shape):
  """`state` loads into the transcription `reference` with strict=True, and both give the same
  CLS and patch tokens on random images of `shape` (NHWC)."""
  reference.load_state_dict(
      {
          key: torch.from_numpy(np.asarray(value, np.float32)) for key, value in state.items()
      },
      strict=True)
  images = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  with torch.no_grad():
    expected = reference.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2))
  cls, patches = backbone.tokens(jnp.asarray(images))
  np.testing.assert_allclose(cls, expected['x_norm_clstoken'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(patches, expected['x_norm_patchtokens'], rtol=1e-5, atol=1e-5)


def test_a_plain_vit_loads_strictly_into_dinos_layout_and_converts_back():
  config, backbone, params = _backbone()
  assert torch_layout.layout_family(config.model) == 'dino'
  state = torch_layout.to_official(params, config.model)
  model = VisionTransformer(16, 4, 3, 32, 2, 2).eval()
  model.load_state_dict(
      {
          key: torch.from_numpy(np.asarray(value, np.float32)) for key, value in state.items()
      },
      strict=True)
  images = np.random.default_rng(2).standard_normal((3, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    expected = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(backbone(jnp.asarray(images)), expected, rtol=1e-5, atol=1e-5)
  _assert_converts_back(state, params)


def _assert_converts_back(state, params):
  back = import_dino.convert(state, params)
  for path, value in torch_layout._leaves(params):
    node = back
    for part in path:
      node = node[part]
    np.testing.assert_array_equal(node, value)


@pytest.mark.parametrize('ffn, registers, mask_k_bias', [('swiglu', 2, True), ('mlp', 0, False)])
def test_a_rope_vit_loads_strictly_into_dinov3s_layout_and_converts_back(
    ffn, registers, mask_k_bias):
  options = dict(pos_embed='rope',
                 mask_token=True,
                 layerscale=0.5,
                 ffn=ffn,
                 num_registers=registers,
                 mask_k_bias=mask_k_bias,
                 norm_eps=1e-5)
  config, backbone, params = _backbone(**options)
  assert torch_layout.layout_family(config.model) == 'dinov3'
  state = torch_layout.to_official(params, config.model)
  assert 'pos_embed' not in state and ('storage_tokens' in state) == bool(registers)
  reference = torch_dinov3.DinoVisionTransformer(patch_size=4,
                                                 embed_dim=32,
                                                 depth=2,
                                                 num_heads=2,
                                                 ffn_layer=ffn,
                                                 layerscale_init=0.5,
                                                 n_storage_tokens=registers,
                                                 mask_k_bias=mask_k_bias).eval()
  _assert_loads_with_the_same_tokens(reference, state, backbone, (2, 16, 20, 3))
  _assert_converts_back(state, params)
  assert torch_layout.describe(state)['rope_base'] == 100.0


def test_a_masked_key_bias_without_rope_is_written_zeroed_where_dinov3_has_no_layout():
  config, _, params = _backbone(layerscale=0.5, mask_k_bias=True)
  state = torch_layout.to_official(params, config.model)
  bias = params['blocks'][0]['attn']['qkv']['bias']
  np.testing.assert_array_equal(state['blocks.0.attn.qkv.bias'][32:64], np.zeros(32))
  np.testing.assert_array_equal(state['blocks.0.attn.qkv.bias'][64:], bias[64:])
  assert 'blocks.0.attn.qkv.bias_mask' not in state


def test_the_conv_stem_has_no_official_layout():
  config, _, params = _backbone(stem='conv')
  with pytest.raises(ValueError, match='--format=npz'):
    torch_layout.to_official(params, config.model)
