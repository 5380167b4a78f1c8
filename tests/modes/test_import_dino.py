"""Importing official DINO PyTorch ViT weights: every tensor in the right place and layout."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs.smoke import get_config as smoke_config
from kldino.modes import attention as attention_mode
from kldino.modes import export as export_mode
from kldino.modes import features as features_mode
from kldino.modes import import_dino as import_mode
from kldino.modes import import_dino as convert_dino
from kldino.modes import pca as pca_mode
from kldino.errors import ConfigError
from kldino.models.registry import build_backbone
from kldino.train import Trainer
from kldino.tools.torch_models import VisionTransformer
from tests.torch_vit import linear_eval_features

IMAGE, PATCH, DIM, DEPTH, HEADS, CHANNELS = 16, 4, 32, 2, 2, 1  # vit_nano, as configs/smoke.py


def _torch_vit(seed=0):
  torch.manual_seed(seed)
  model = VisionTransformer(IMAGE, PATCH, CHANNELS, DIM, DEPTH, HEADS).eval()
  with torch.no_grad():  # every tensor random, so that no misplaced one goes unnoticed
    for parameter in model.parameters():
      parameter.copy_(torch.randn_like(parameter) * 0.3)
  return model


def _numpy_state_dict(model):
  return {key: value.detach().numpy() for key, value in model.state_dict().items()}


def _kldino_vit(params):
  backbone = build_backbone(smoke_config().model,
                            in_channels=CHANNELS,
                            image_size=IMAGE,
                            rngs=nnx.Rngs(0))
  state = nnx.state(backbone, nnx.Param)
  if params is not None:
    nnx.replace_by_pure_dict(state, params)
    nnx.update(backbone, state)
  return backbone, nnx.to_pure_dict(state)


def _images(seed=1, count=5):
  return np.random.default_rng(seed).standard_normal(
      (count, IMAGE, IMAGE, CHANNELS)).astype(np.float32)


def _torch_features(model, images_nhwc):
  with torch.no_grad():
    return model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).numpy()


def test_every_tensor_lands_in_place_with_kldino_layout():
  state_dict = _numpy_state_dict(_torch_vit())
  _, template = _kldino_vit(None)
  params = convert_dino.convert(convert_dino.backbone_state_dict(state_dict), template)
  np.testing.assert_array_equal(params['blocks'][1]['attn']['qkv']['kernel'],
                                state_dict['blocks.1.attn.qkv.weight'].T)
  np.testing.assert_array_equal(params['blocks'][0]['mlp']['fc2']['kernel'],
                                state_dict['blocks.0.mlp.fc2.weight'].T)
  np.testing.assert_array_equal(params['blocks'][0]['norm2']['scale'],
                                state_dict['blocks.0.norm2.weight'])
  # OIHW -> HWIO: kernel[i, j, c, d] is weight[d, c, i, j].
  weight = state_dict['patch_embed.proj.weight']
  np.testing.assert_array_equal(params['patch_embed']['kernel'][1, 3, 0, 5], weight[5, 0, 1, 3])
  np.testing.assert_array_equal(params['pos_embed'], state_dict['pos_embed'])
  np.testing.assert_array_equal(params['norm']['bias'], state_dict['norm.bias'])


def test_one_attention_block_computes_the_same_both_ways():
  model = _torch_vit()
  params = convert_dino.convert(_numpy_state_dict(model), _kldino_vit(None)[1])
  backbone, _ = _kldino_vit(params)
  tokens = np.random.default_rng(2).standard_normal((3, 17, DIM)).astype(np.float32)
  with torch.no_grad():
    expected = model.blocks[0](torch.from_numpy(tokens)).numpy()
  np.testing.assert_allclose(np.asarray(backbone.blocks[0](jnp.asarray(tokens))),
                             expected,
                             atol=1e-5,
                             rtol=1e-5)


def test_imported_backbone_gives_the_official_features():
  model = _torch_vit()
  params = convert_dino.convert(_numpy_state_dict(model), _kldino_vit(None)[1])
  backbone, _ = _kldino_vit(params)
  images = _images()
  np.testing.assert_allclose(np.asarray(backbone(jnp.asarray(images))),
                             _torch_features(model, images),
                             atol=1e-5,
                             rtol=1e-5)


def test_missing_or_foreign_keys_are_refused():
  state_dict = _numpy_state_dict(_torch_vit())
  _, template = _kldino_vit(None)
  with pytest.raises(ValueError, match='blocks/1/mlp/fc1'):
    convert_dino.convert(
        {
            k: v for k, v in state_dict.items() if not k.startswith('blocks.1.mlp.fc1')
        }, template)
  with pytest.raises(ValueError, match="unexpected key 'fc_norm.weight'"):
    convert_dino.convert({**state_dict, 'fc_norm.weight': np.ones(DIM, np.float32)}, template)


@pytest.fixture(scope='module')
def imported_workdir(tmp_path_factory):
  """--mode=import of a DINO *training* checkpoint ('teacher' with module./backbone. prefixes)."""
  model = _torch_vit()
  prefixed = {f'module.backbone.{k}': v for k, v in model.state_dict().items()}
  prefixed['module.head.last_layer.weight'] = torch.zeros(4, 4)  # the DINO head: skipped
  path = str(tmp_path_factory.mktemp('pth') / 'dino_checkpoint.pth')
  torch.save({'teacher': prefixed, 'student': prefixed, 'epoch': 3}, path)
  workdir = str(tmp_path_factory.mktemp('imported'))
  written = import_mode.run(smoke_config(), workdir, import_from=path)
  return model, workdir, written, path


def test_import_mode_writes_a_step0_checkpoint_that_features_and_training_use(
    imported_workdir, tmp_path):
  model, workdir, written, _ = imported_workdir
  assert written['step'] == 0 and written['tensors'] == len(model.state_dict())
  images = _images(seed=3, count=7)
  inputs = str(tmp_path / 'inputs.npy')
  np.save(inputs, images)
  result = features_mode.run(smoke_config(),
                             workdir,
                             step=None,
                             output=str(tmp_path / 'f.npy'),
                             split=None,
                             inputs=inputs)
  np.testing.assert_allclose(np.load(result['features']),
                             _torch_features(model, images),
                             atol=1e-5,
                             rtol=1e-5)
  # Training starts from the imported weights: student and teacher backbones hold them.
  trainer = Trainer(smoke_config(), workdir)
  state = trainer.restore_or_init()
  assert int(state.step) == 0
  for params in (state.student, state.teacher):
    np.testing.assert_array_equal(
        np.asarray(params['backbone']['blocks'][1]['attn']['proj']['kernel']),
        model.state_dict()['blocks.1.attn.proj.weight'].numpy().T)


def test_import_refuses_the_wrong_architecture_and_a_used_workdir(imported_workdir, tmp_path):
  _, workdir, _, path = imported_workdir
  with pytest.raises(ConfigError, match='already has checkpoints'):
    import_mode.run(smoke_config(), workdir, import_from=path)
  config = smoke_config()
  config.model.name = 'vit_micro'
  with pytest.raises(ConfigError, match=r'dim 32 \(config: 128\), depth 2 \(config: 4\)'):
    import_mode.run(config, str(tmp_path / 'other'), import_from=path)


def test_export_pth_is_dinos_layout_with_the_imported_tensors(imported_workdir, tmp_path):
  """--format=pth of a plain ViT: DINO's VisionTransformer loads it with strict=True, and every
  tensor is the one imported."""
  model, workdir, _, _ = imported_workdir
  written = export_mode.run(smoke_config(),
                            workdir,
                            step=None,
                            output=str(tmp_path / 'teacher.pth'),
                            format='pth')
  state = torch.load(written['export'], weights_only=True)
  reloaded = VisionTransformer(IMAGE, PATCH, CHANNELS, DIM, DEPTH, HEADS)
  reloaded.load_state_dict(state, strict=True)
  for key, value in model.state_dict().items():
    torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
  with pytest.raises(ConfigError, match='--format=jpg: choose one of npz, pth'):
    export_mode.run(smoke_config(), workdir, step=None, output=None, format='jpg')


def test_import_export_and_array_features_read_no_dataset(tmp_path):
  """import, export and features of --inputs need the config and the weights only: an
  unprepared TFDS dataset (as imagenet2012 before its preparation) is never opened."""
  model = _torch_vit(seed=4)
  path = str(tmp_path / 'vit.pth')
  torch.save(model.state_dict(), path)
  config = smoke_config()
  config.data.name = 'imagenet2012'
  config.data.data_dir = str(tmp_path / 'no_tfds_here')
  workdir = str(tmp_path / 'run')
  import_mode.run(config, workdir, import_from=path)
  exported = export_mode.run(config, workdir, step=None, output=str(tmp_path / 'backbone.npz'))
  with np.load(exported['export']) as arrays:
    np.testing.assert_array_equal(arrays['norm/scale'], model.state_dict()['norm.weight'].numpy())
  images = _images(seed=5, count=3)
  np.save(str(tmp_path / 'x.npy'), images)
  result = features_mode.run(config,
                             workdir,
                             step=None,
                             output=str(tmp_path / 'f.npy'),
                             split=None,
                             inputs=str(tmp_path / 'x.npy'))
  np.testing.assert_allclose(np.load(result['features']),
                             _torch_features(model, images),
                             atol=1e-5,
                             rtol=1e-5)
  assert not os.path.exists(config.data.data_dir)


@pytest.mark.parametrize('n_last_blocks, avgpool', [(2, False), (1, True)])
def test_features_mode_gives_dinos_linear_eval_features(imported_workdir, tmp_path, n_last_blocks,
                                                        avgpool):
  model, workdir, _, _ = imported_workdir
  config = smoke_config()
  config.eval.n_last_blocks, config.eval.avgpool_patchtokens = n_last_blocks, avgpool
  images = _images(seed=6, count=4)
  np.save(str(tmp_path / 'x.npy'), images)
  result = features_mode.run(config,
                             workdir,
                             step=None,
                             output=str(tmp_path / 'f.npy'),
                             split=None,
                             inputs=str(tmp_path / 'x.npy'))
  with torch.no_grad():
    expected = linear_eval_features(model,
                                    torch.from_numpy(images).permute(0, 3, 1, 2), n_last_blocks,
                                    avgpool).numpy()
  assert result['feature_dim'] == 2 * DIM
  np.testing.assert_allclose(np.load(result['features']), expected, atol=1e-5, rtol=1e-5)


def _dino_threshold(attention: torch.Tensor, keep: float) -> torch.Tensor:
  """visualize_attention.py's mask, written out: ascending sort, normalised cumulative mass above
  1 - keep, scattered back to the patches' order."""
  values, order = torch.sort(attention, dim=-1)
  values = values / values.sum(dim=-1, keepdim=True)
  kept_sorted = torch.cumsum(values, dim=-1) > 1 - keep
  return torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)


def _saved(tmp_path, images):
  """The path of `images` saved as the .npy that --inputs takes."""
  np.save(str(tmp_path / 'inputs.npy'), images)
  return str(tmp_path / 'inputs.npy')


def _draw(mode, workdir, output, *, inputs=None, split=None, num_images=8, config=None):
  """A mode that draws images (attention, pca): its run as the command line calls it."""
  return mode.run(config or smoke_config(),
                  workdir,
                  step=None,
                  output=output,
                  split=split,
                  num_images=num_images,
                  inputs=inputs)


def _check_split(mode, workdir, output, array, shape):
  """The mode on a split: its first 4 images in evaluation order, with their files and labels."""
  written = _draw(mode, workdir, output, split='test', num_images=4)
  assert written['num_images'] == 4 and np.load(written[array]).shape == shape
  with open(written['index']) as f:
    assert [entry['label'] for entry in json.load(f)] != [None] * 4


def test_attention_mode_gives_the_official_last_block_attention(imported_workdir, tmp_path):
  """--mode=attention of imported DINO weights: the softmax weights from CLS to each patch of the
  last block equal the PyTorch model's get_last_selfattention()[:, :, 0, 1:] to 1e-5; the 60 %
  mass masks equal DINO's; one PNG per image and the index."""
  from kldino.evaluate import pictures  # pylint: disable=import-outside-toplevel
  model, workdir, _, _ = imported_workdir
  images = _images(seed=5, count=3)
  output = str(tmp_path / 'attention')
  written = _draw(attention_mode, workdir, output, inputs=_saved(tmp_path, images))
  with torch.no_grad():
    expected = model.get_last_selfattention(torch.from_numpy(images).permute(0, 3, 1, 2))[:, :, 0,
                                                                                          1:]
  attention = np.load(written['attention'])
  assert attention.dtype == np.float32 and attention.shape == (3, HEADS, (IMAGE // PATCH)**2)
  np.testing.assert_allclose(attention, expected.numpy(), atol=1e-5)
  np.testing.assert_array_equal(pictures.mass_threshold(attention, 0.6),
                                _dino_threshold(expected, 0.6).numpy())
  assert sorted(os.listdir(output)) == ['0.png', '1.png', '2.png', 'attention.npy', 'index.json']
  _check_split(attention_mode, workdir, str(tmp_path / 'split'), 'attention', (4, HEADS, 16))


def test_attention_mode_refuses_a_convnet(tmp_path):
  config = smoke_config()
  config.model.name = 'convnet_small'
  with pytest.raises(ConfigError, match='model.name=convnet_small has none'):
    _draw(attention_mode, str(tmp_path), str(tmp_path / 'a'), config=config)


def _svd_first_component(patches):
  """The first principal component's scores of all patches [N, P, D] together, from the SVD."""
  rows = patches.reshape(-1, patches.shape[-1]).astype(np.float64)
  u, s, _ = np.linalg.svd(rows - rows.mean(axis=0), full_matrices=False)
  return (u[:, 0] * s[0]).reshape(patches.shape[:2])


def test_pca_mode_gives_the_pca_of_the_official_patch_tokens(imported_workdir, tmp_path):
  """--mode=pca of imported DINO weights: the first component is that of the PyTorch model's
  normed patch tokens (up to its sign), the foreground is where it is > 0 and only there is RGB
  in [0, 1]; one PNG per image (the image, the first component, the RGB), the sheet, the index."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  model, workdir, _, _ = imported_workdir
  images = _images(seed=6, count=3)
  output = str(tmp_path / 'pca')
  written = _draw(pca_mode, workdir, output, inputs=_saved(tmp_path, images))
  with torch.no_grad():
    _, patches = model.forward_tokens(torch.from_numpy(images).permute(0, 3, 1, 2))
  expected = _svd_first_component(patches.numpy())
  pca = np.load(written['pca'])
  assert pca.dtype == np.float32 and pca.shape == (3, (IMAGE // PATCH)**2, 4)
  sign = np.sign(np.sum(pca[..., 0] * expected))
  np.testing.assert_allclose(pca[..., 0], sign * expected, atol=1e-4)
  foreground = pca[..., 0] > 0
  assert foreground.any() and (~foreground).any()
  assert not np.any(pca[~foreground][:, 1:])
  np.testing.assert_allclose(np.ptp(pca[foreground][:, 1:], axis=0), 1.0, atol=1e-6)
  assert sorted(
      os.listdir(output)) == ['0.png', '1.png', '2.png', 'index.json', 'pca.npy', 'sheet.png']
  # 16-pixel images are drawn as 96-pixel cells with 4-pixel gaps: the RGB cell is the third.
  drawn = np.asarray(Image.open(os.path.join(output, '1.png')))
  assert drawn.shape == (104, 304, 3)
  pixels, side = 24, IMAGE // PATCH  # a patch is 24 x 24 pixels of a cell
  row, column = divmod(int(np.argmax(foreground[1])), side)  # a foreground patch, in colour
  np.testing.assert_array_equal(drawn[4 + row * pixels + 12, 204 + column * pixels + 12],
                                np.round(pca[1, row * side + column, 1:] * 255).astype(np.uint8))
  assert Image.open(written['sheet']).size == (304, 3 * 100 + 4)
  _check_split(pca_mode, workdir, str(tmp_path / 'split'), 'pca', (4, 16, 4))


def test_pca_mode_refuses_a_convnet_and_too_few_patches(tmp_path):
  """Both before any checkpoint is read (the workdir has none)."""
  config = smoke_config()
  config.model.name = 'convnet_small'
  with pytest.raises(ConfigError, match="shows a ViT's patch tokens: model.name=convnet_small"):
    _draw(pca_mode, str(tmp_path), str(tmp_path / 'p'), config=config)
  inputs = _saved(tmp_path, np.zeros((3, PATCH, PATCH, CHANNELS), np.float32))  # 1 patch each
  with pytest.raises(ConfigError, match=r'at least 4 patches in all, got 3 \(3 images of 1x1\)'):
    _draw(pca_mode, str(tmp_path), str(tmp_path / 'p'), inputs=inputs)
