"""The bench's PyTorch baseline (kldino/tools/torch_baseline.py) is kldino's train step: from the
same parameters and batch, one step of each gives the same loss, gradients, student and teacher."""
import jax
import numpy as np
import pytest
import torch

from kldino.core import program as program_lib
from kldino.tools import bench
from kldino.modes import import_dino as convert_dino
from kldino.core import optim
from kldino.core import sharding
from kldino.core import step as step_lib
from kldino.tools import torch_baseline
from kldino.config.defaults import base_config

CHANNELS = 3


def _config(normalization: str, freeze_epochs: int):
  config = base_config()
  config.model.update(name='vit_nano',
                      patch_size=4,
                      drop_path=0.0,
                      num_prototypes=64,
                      head_hidden_dim=48,
                      head_bottleneck_dim=16,
                      head_num_layers=3,
                      head_norm='none')
  # Local crops of the global size: the multi-crop pairs without resizing position embeddings
  # (DINO's bicubic and jax.image.resize's differ; the baseline's resize is tested below).
  config.aug.update(global_size=16, local_size=16, num_local=2)
  config.batch_size = 8
  # A weight decay large enough that one step's decay (lr * wd * w) shows above the tolerance.
  config.optim.update(warmup_epochs=0,
                      freeze_prototypes_epochs=freeze_epochs,
                      weight_decay=4.0,
                      weight_decay_end=4.0)
  config.objective.normalization = normalization
  return config


def _head_params(state: dict, prefix: str, num_layers: int) -> dict:
  params = {
      'layers': {
          index: {
              'kernel': state[f'{prefix}.mlp.{2 * index}.weight'].T,
              'bias': state[f'{prefix}.mlp.{2 * index}.bias']
          } for index in range(num_layers)
      },
      'prototypes': state[f'{prefix}.last_layer.weight_v'].T,
  }
  if f'{prefix}.last_layer.weight_g' in state:
    params['prototype_gain'] = state[f'{prefix}.last_layer.weight_g'].T
  return params


def _kldino_params(baseline_model, template: dict) -> dict:
  """The baseline's parameters in kldino's tree (the backbone as DINO's checkpoints convert)."""
  state = {key: value.detach().numpy() for key, value in baseline_model.state_dict().items()}
  backbone = {key: value for key, value in state.items() if key.startswith('backbone.')}
  params = {
      'backbone':
          convert_dino.convert(convert_dino.backbone_state_dict(backbone), template['backbone'])
  }
  for head in ('head', 'patch_head'):
    if head in template:
      params[head] = _head_params(state, head, len(template[head]['layers']))
  return params


def _leaves(tree) -> dict:
  return {
      jax.tree_util.keystr(path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _steps_of_both(config, steps: int = 1):
  """`steps` steps of kldino's and of the baseline from the baseline's initial parameters on the
  same batch: (kldino's state, its losses, the initial parameters, the baseline)."""
  baseline = torch_baseline.TorchDinoStep(config, CHANNELS, seed=3)
  graphdef, template = step_lib.build_graphdef(config, CHANNELS)
  params = _kldino_params(baseline.student, template)
  assert jax.tree.structure(params) == jax.tree.structure(template)
  mesh = sharding.make_mesh(config.mesh)
  program = program_lib.build(config, graphdef, CHANNELS, mesh, steps_per_epoch=100)
  optimizer = optim.make_optimizer(config.optim, program.schedules)
  state = program.init(0)
  state = state.replace(student=params, teacher=params, opt_state=optimizer.init(params))
  crops = bench.random_crops(config, CHANNELS)
  batch = jax.device_put(crops, sharding.batch_sharding(mesh))
  losses = []
  for _ in range(steps):
    state, metrics = program.train_step(state, batch)
    got = baseline.step(**{name: torch.from_numpy(array) for name, array in crops.items()})
    losses.append((float(metrics['loss']), got))
  return state, losses, params, baseline, float(program.schedules.learning_rate(0))


def _assert_same_models(state, baseline, template, lr: float):
  for name, (expected, got) in {
      'student': (state.student, _kldino_params(baseline.student, template)),
      'teacher': (state.teacher, _kldino_params(baseline.teacher, template)),
  }.items():
    expected, got = _leaves(expected), _leaves(got)
    assert expected.keys() == got.keys()
    for key in expected:
      if key.endswith("['attn']['qkv']['bias']"):
        # The key bias adds q . b_k to a whole row of scores, which the softmax ignores: its
        # gradient is 0 up to rounding, and Adam's first step turns rounding into +-lr.
        dim = expected[key].shape[0] // 3
        expected[key], got[key] = (
            np.delete(tree[key], np.s_[dim:2 * dim]) for tree in (expected, got))
      # AdamW's first step moves each weight by about lr; float rounding changes that by far less.
      np.testing.assert_allclose(got[key],
                                 expected[key],
                                 rtol=1e-5,
                                 atol=0.02 * lr,
                                 err_msg=f'{name}{key}')


@pytest.mark.parametrize('normalization, freeze_epochs', [('prior', 1), ('center', 0)])
def test_one_step_equals_kldinos(normalization, freeze_epochs):
  config = _config(normalization, freeze_epochs)
  state, losses, params, baseline, lr = _steps_of_both(config)
  np.testing.assert_allclose(*losses[0], rtol=1e-5)
  _assert_same_models(state, baseline, params, lr)
  prototypes = "['head']['prototypes']"
  moved = not np.array_equal(_leaves(state.student)[prototypes], params['head']['prototypes'])
  assert moved == (freeze_epochs == 0)  # frozen prototypes do not move in either
  if normalization == 'center':
    np.testing.assert_allclose(baseline.norm_state['image']['center'].numpy(),
                               np.asarray(state.norm_state['center']),
                               rtol=1e-5,
                               atol=1e-7)


def _dinov2_config(patch_normalization: str, separate_head: bool):
  """DINOv2's step on a nano ViT: every option the baseline builds beyond DINO's, each set so
  that a difference shows within two steps."""
  config = _config('center', freeze_epochs=0)
  config.model.update(layerscale=0.5,
                      ffn='swiglu',
                      num_registers=2,
                      mask_token=True,
                      drop_path_uniform=True,
                      pos_interpolation='torch',
                      interpolate_offset=0.1,
                      interpolate_antialias=True,
                      norm_last_layer=False)
  config.aug.local_size = 8  # the position table resized as DINOv2 resizes it
  config.objective.update(patch_normalization=patch_normalization,
                          koleo_weight=0.1,
                          koleo_group_size=4,
                          teacher_temp=0.04,
                          teacher_temp_warmup='per_step')
  config.objective.ibot.update(loss_weight=0.7, separate_head=separate_head)
  # A clip that binds (it rescales the two steps' gradients differently, which Adam's second step
  # sees), DINOv2's lr scaling and parameter groups.
  config.optim.update(clip_grad=0.05,
                      clip_mode='per_module',
                      lr_scaling='sqrt_wrt_1024',
                      layerwise_decay=0.5,
                      patch_embed_lr_mult=0.2)
  return config


@pytest.mark.parametrize('patch_normalization, separate_head', [('prior', False), ('center', True)])
def test_two_dinov2_steps_equal_kldinos(patch_normalization, separate_head):
  """iBOT (shared or separate head), KoLeo per group, LayerScale, SwiGLU, registers, the mask
  token, DINOv2's interpolation, the learned prototype gain, per-module clipping and DINOv2's
  parameter groups: two steps of each give the same losses, students, teachers and centers."""
  config = _dinov2_config(patch_normalization, separate_head)
  state, losses, params, baseline, lr = _steps_of_both(config, steps=2)
  for expected, got in losses:
    np.testing.assert_allclose(got, expected, rtol=1e-5)
  _assert_same_models(state, baseline, params, lr)
  for kind, kldino_state in (('image', state.norm_state), ('patch', state.norm_state['patch'])):
    np.testing.assert_allclose(baseline.norm_state[kind]['center'].numpy(),
                               np.asarray(kldino_state['center']),
                               rtol=1e-5,
                               atol=1e-7)
  # The patch center moves with its own normalisation only.
  assert np.any(np.asarray(
      state.norm_state['patch']['center'])) == (patch_normalization == 'center')


def test_two_dinov3_steps_equal_kldinos():
  """RoPE instead of the position table (local crops at another grid), iBOT on a separate head,
  Sinkhorn-Knopp on image and patch targets: two steps give kldino's losses and models."""
  config = _dinov2_config('sinkhorn', separate_head=True)
  config.objective.normalization = 'sinkhorn'
  config.model.update(pos_embed='rope', rope_normalize_coords='separate')
  state, losses, params, baseline, lr = _steps_of_both(config, steps=2)
  assert 'pos_embed' not in params['backbone']
  for expected, got in losses:
    np.testing.assert_allclose(got, expected, rtol=1e-5)
  _assert_same_models(state, baseline, params, lr)


def test_configs_it_does_not_build_are_named():
  config = base_config()  # the digits head: batch norm inside the MLP
  with pytest.raises(ValueError, match="model.head_norm='batch'"):
    torch_baseline.check_config(config)
  config.model.update(head_norm='none', name='vit_nano', pos_embed='rope', rope_jitter_coords=1.4)
  with pytest.raises(ValueError, match="DINOv3's ViT options \\(model.rope_shift_coords"):
    torch_baseline.check_config(config)
