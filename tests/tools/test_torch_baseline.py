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


def _kldino_params(baseline_model, template: dict) -> dict:
  """The baseline's parameters in kldino's tree (the backbone as DINO's checkpoints convert)."""
  state = {key: value.detach().numpy() for key, value in baseline_model.state_dict().items()}
  head = template['head']
  linears = [state[f'head.mlp.{2 * index}.weight'] for index in range(len(head['layers']))]
  return {
      'backbone':
          convert_dino.convert(convert_dino.backbone_state_dict(state), template['backbone']),
      'head': {
          'layers': {
              index: {
                  'kernel': weight.T,
                  'bias': state[f'head.mlp.{2 * index}.bias']
              } for index, weight in enumerate(linears)
          },
          'prototypes': state['head.last_layer.weight_v'].T,
      },
  }


def _leaves(tree) -> dict:
  return {
      jax.tree_util.keystr(path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


@pytest.mark.parametrize('normalization, freeze_epochs', [('prior', 1), ('center', 0)])
def test_one_step_equals_kldinos(normalization, freeze_epochs):
  config = _config(normalization, freeze_epochs)
  baseline = torch_baseline.TorchDinoStep(config, CHANNELS, seed=3)
  graphdef, template = step_lib.build_graphdef(config, CHANNELS)
  params = _kldino_params(baseline.student, template)
  assert jax.tree.structure(params) == jax.tree.structure(template)
  mesh = sharding.make_mesh(config.mesh)
  program = program_lib.build(config, graphdef, CHANNELS, mesh, steps_per_epoch=100)
  schedules, train_step = program.schedules, program.train_step
  optimizer = optim.make_optimizer(config.optim, schedules)
  state = program.init(0)
  state = state.replace(student=params, teacher=params, opt_state=optimizer.init(params))
  crops = bench.random_crops(config, CHANNELS)
  state, metrics = train_step(state, jax.device_put(crops, sharding.batch_sharding(mesh)))

  loss = baseline.step(**{name: torch.from_numpy(array) for name, array in crops.items()})

  np.testing.assert_allclose(loss, float(metrics['loss']), rtol=1e-5)
  lr = float(schedules.learning_rate(0))
  for name, (expected, got) in {
      'student': (state.student, _kldino_params(baseline.student, template)),
      'teacher': (state.teacher, _kldino_params(baseline.teacher, template)),
  }.items():
    expected, got = _leaves(expected), _leaves(got)
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
  prototypes = "['head']['prototypes']"
  moved = not np.array_equal(_leaves(state.student)[prototypes], params['head']['prototypes'])
  assert moved == (freeze_epochs == 0)  # frozen prototypes do not move in either
  if normalization == 'center':
    np.testing.assert_allclose(baseline.center.numpy(),
                               np.asarray(state.norm_state['center']),
                               rtol=1e-5,
                               atol=1e-7)


def test_local_crops_resize_the_position_embeddings_as_dino():
  """Smaller crops get DINO's bicubic resize of the learned position table (a = -0.75)."""
  model = torch_baseline.VisionTransformer(16, 4, CHANNELS, 32, 2, 2)
  table = model.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
  resized = torch.nn.functional.interpolate(table, size=(2, 2), mode='bicubic', align_corners=False)
  got = model._position_embedding(2, 2)
  assert got.shape == (1, 5, 32)
  torch.testing.assert_close(got[:, 1:], resized.permute(0, 2, 3, 1).reshape(1, 4, 32))
  assert model(torch.zeros(3, CHANNELS, 8, 8)).shape == (3, 32)


def test_configs_it_does_not_build_are_named():
  config = base_config()  # the digits head: batch norm inside the MLP
  with pytest.raises(ValueError, match="model.head_norm='batch'"):
    torch_baseline.check_config(config)
