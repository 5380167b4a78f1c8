"""Frozen prototypes as in DINO: PyTorch's AdamW skips a parameter whose .grad is None.

The reference is torch.optim.AdamW run as DINO runs it (two param groups, lr and weight decay set
per iteration, per-parameter clipping, the last layer's grads set to None in the first
iterations). kldino's side is `optim.apply_gradients`, the train step's update.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from kldino.core import optim
from kldino.core import schedules as schedules_lib
from kldino.core import step
from tests.helpers import dinov2_config, tiny_config
from tests.core.test_step import run_steps

NUM_STEPS = 12
FROZEN_STEPS = 5  # DINO's freeze_last_layer, in iterations
CLIP = 1.0
SHAPES = {
    'backbone': {
        'w': (6, 5),
        'bias': (5,)
    },
    'head': {
        'layer': {
            'kernel': (5, 4),
            'bias': (4,)
        },
        'prototypes': (4, 7),
        'prototype_gain': (7,)
    },
}
PROTOTYPE_NAMES = ('head/prototypes', 'head/prototype_gain')


def _flat(tree):
  return {
      jax.tree_util.keystr(path, simple=True, separator='/'): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _unflat(flat):
  tree = {}
  for name, value in flat.items():
    *parents, leaf = name.split('/')
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = jnp.asarray(value)
  return tree


def _problem(seed=0):
  """Initial parameters and NUM_STEPS gradients, large enough that most get clipped (and some
  small enough that they do not)."""
  rng = np.random.default_rng(seed)
  shapes = _flat(jax.tree.map(np.zeros, SHAPES, is_leaf=lambda x: isinstance(x, tuple)))
  params = {name: rng.standard_normal(v.shape).astype(np.float32) for name, v in shapes.items()}
  grads = [{
      name: (rng.choice([0.05, 3.0]) * rng.standard_normal(v.shape)).astype(np.float32)
      for name, v in shapes.items()
  }
           for _ in range(NUM_STEPS)]
  return params, grads


def _schedules():
  return types.SimpleNamespace(
      learning_rate=optax.warmup_cosine_decay_schedule(init_value=1e-3,
                                                       peak_value=1e-2,
                                                       warmup_steps=3,
                                                       decay_steps=NUM_STEPS,
                                                       end_value=1e-3),
      weight_decay=schedules_lib.cosine_interpolation(0.04, 0.4, NUM_STEPS))


def _torch_run(params, grads, scheds, clip_mode):
  """DINO's loop: per-iteration lr / wd, clip_gradients, cancel_gradients_last_layer, step."""
  tensors = {name: torch.nn.Parameter(torch.tensor(value)) for name, value in params.items()}
  regularized = [p for p in tensors.values() if p.ndim > 1]
  not_regularized = [p for p in tensors.values() if p.ndim == 1]
  optimizer = torch.optim.AdamW([{
      'params': regularized
  }, {
      'params': not_regularized,
      'weight_decay': 0.0
  }],
                                foreach=False)
  assert optimizer.defaults['betas'] == (optim.ADAM_B1, optim.ADAM_B2)
  assert optimizer.defaults['eps'] == optim.ADAM_EPS
  history = []
  for it, step_grads in enumerate(grads):
    for group_index, group in enumerate(optimizer.param_groups):
      group['lr'] = float(scheds.learning_rate(it))
      if group_index == 0:
        group['weight_decay'] = float(scheds.weight_decay(it))
    for name, tensor in tensors.items():
      tensor.grad = torch.tensor(step_grads[name])
    if clip_mode == 'per_param':  # DINO's utils.clip_gradients
      for tensor in tensors.values():
        clip_coef = CLIP / (tensor.grad.norm(2).item() + 1e-6)
        if clip_coef < 1:
          tensor.grad.mul_(clip_coef)
    if it < FROZEN_STEPS:  # DINO's utils.cancel_gradients_last_layer
      for name in PROTOTYPE_NAMES:
        tensors[name].grad = None
    if clip_mode == 'global':  # over the parameters that have a gradient
      torch.nn.utils.clip_grad_norm_([t for t in tensors.values() if t.grad is not None], CLIP)
    optimizer.step()
    history.append({name: t.detach().numpy().copy() for name, t in tensors.items()})
  return history, optimizer, tensors


def _kldino_run(params, grads, scheds, clip_mode):
  config = types.SimpleNamespace(clip_grad=CLIP,
                                 clip_mode=clip_mode,
                                 layerwise_decay=1.0,
                                 patch_embed_lr_mult=1.0)
  optimizer = optim.make_optimizer(config, scheds)
  state_params = _unflat(params)
  opt_state = optimizer.init(state_params)
  apply = jax.jit(lambda p, s, g, frozen: optim.apply_gradients(optimizer, p, s, g, frozen))
  history, states = [], []
  for it, step_grads in enumerate(grads):
    state_params, opt_state = apply(state_params, opt_state, _unflat(step_grads),
                                    jnp.asarray(it < FROZEN_STEPS))
    history.append(_flat(state_params))
    states.append(opt_state)
  return history, states


def _legacy_run(params, grads, scheds):
  """kldino before: one optax.adamw (one step count, moments decaying through the freeze), the
  prototypes' gradient and update zeroed while frozen."""
  optimizer = optax.chain(
      optim.clip_by_param_norm(CLIP),
      optax.adamw(scheds.learning_rate, weight_decay=scheds.weight_decay, mask=optim.decay_mask))
  state_params = _unflat(params)
  opt_state = optimizer.init(state_params)
  history = []
  for it, step_grads in enumerate(grads):
    frozen = it < FROZEN_STEPS
    grad_tree = optim.zero_prototypes(_unflat(step_grads), frozen)
    updates, opt_state = optimizer.update(grad_tree, opt_state, state_params)
    state_params = optax.apply_updates(state_params, optim.zero_prototypes(updates, frozen))
    history.append(_flat(state_params))
  return history


def test_labels_cover_every_head_prototype_key():
  labels = _flat(optim.freeze_labels(_unflat(_problem()[0])))
  assert {name for name, label in labels.items() if label == optim.PROTOTYPES
         } == set(PROTOTYPE_NAMES)
  other = {'backbone': {'prototypes': 0.0}, 'head': {'last': {'prototypes': 0.0}}}
  assert set(jax.tree.leaves(optim.freeze_labels(other))) == {optim.REST}


@pytest.mark.parametrize('clip_mode', ['per_param', 'global'])
def test_matches_torch_adamw_with_grad_none_across_unfreeze(clip_mode):
  params, grads = _problem()
  scheds = _schedules()
  expected, torch_optimizer, tensors = _torch_run(params, grads, scheds, clip_mode)
  actual, states = _kldino_run(params, grads, scheds, clip_mode)
  max_diff = 0.0
  for it in range(NUM_STEPS):
    for name in params:
      np.testing.assert_allclose(actual[it][name],
                                 expected[it][name],
                                 rtol=1e-6,
                                 atol=1e-6,
                                 err_msg=f'{name} after step {it}')
      max_diff = max(max_diff, float(np.max(np.abs(actual[it][name] - expected[it][name]))))
    # The prototypes' Adam count is torch's per-parameter step; the rest's is the global step.
    assert int(optim.adam_state(states[it],
                                optim.PROTOTYPES).count) == max(0, it + 1 - FROZEN_STEPS)
    assert int(optim.adam_state(states[it], optim.REST).count) == it + 1
  # Frozen: untouched (no Adam step and no weight decay); then they learn.
  for name in PROTOTYPE_NAMES:
    for it in range(FROZEN_STEPS):
      np.testing.assert_array_equal(actual[it][name], params[name])
    assert not np.allclose(actual[-1][name], params[name])
    assert torch_optimizer.state[tensors[name]]['step'] == NUM_STEPS - FROZEN_STEPS
  print(f'{clip_mode}: max |kldino - torch| over {NUM_STEPS} steps: {max_diff:.3g}')


def test_first_update_after_unfreeze_has_fresh_bias_correction():
  params, grads = _problem()
  scheds = _schedules()
  expected, _, _ = _torch_run(params, grads, scheds, 'per_param')
  actual, _ = _kldino_run(params, grads, scheds, 'per_param')
  legacy = _legacy_run(params, grads, scheds)
  it = FROZEN_STEPS  # the first step that updates the prototypes
  lr, wd = float(scheds.learning_rate(it)), float(scheds.weight_decay(it))
  for name in PROTOTYPE_NAMES:
    before = actual[it - 1][name]
    grad = grads[it][name]
    grad = grad * min(1.0, CLIP / (np.linalg.norm(grad) + 1e-6))
    # Adam's own step 1: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps).
    decay = wd if before.ndim > 1 else 0.0
    fresh = -lr * (grad / (np.abs(grad) + optim.ADAM_EPS) + decay * before)
    torch_delta = expected[it][name] - expected[it - 1][name]
    np.testing.assert_allclose(torch_delta, fresh, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(actual[it][name] - before, torch_delta, rtol=1e-4, atol=1e-7)
    # One shared count (and moments decayed through the freeze) gives about half that step.
    legacy_delta = legacy[it][name] - legacy[it - 1][name]
    ratio = np.linalg.norm(legacy_delta) / np.linalg.norm(torch_delta)
    assert ratio < 0.7, (name, ratio)
  # The other parameters were never frozen: there the old optimizer and the new one agree.
  for name in params:
    if name not in PROTOTYPE_NAMES:
      np.testing.assert_allclose(legacy[-1][name], actual[-1][name], rtol=1e-6, atol=1e-7)


def test_train_step_holds_the_prototypes_adam_state_while_frozen():
  config = tiny_config()
  config.optim.freeze_prototypes_epochs = 1  # 10 steps
  initial, state, _, _ = run_steps(config, jax.devices()[:1], num_steps=2)
  np.testing.assert_array_equal(initial.student['head']['prototypes'],
                                state.student['head']['prototypes'])
  prototypes = optim.adam_state(state.opt_state, optim.PROTOTYPES)
  rest = optim.adam_state(state.opt_state, optim.REST)
  assert int(prototypes.count) == 0 and int(rest.count) == 2
  assert not np.any(prototypes.mu['head']['prototypes'])
  assert not np.any(prototypes.nu['head']['prototypes'])
  assert np.any(rest.mu['backbone']['cls_token'])
  assert not np.allclose(initial.student['backbone']['cls_token'],
                         state.student['backbone']['cls_token'])


def dinov2_lr_decay_rate(name, lr_decay_rate, num_layers):
  """dinov2/utils/param_groups.py:get_vit_lr_decay_rate for a name of kldino's tree (DINOv2's
  dots for kldino's slashes)."""
  layer_id = num_layers + 1
  if name.startswith('backbone'):
    if any(f'.{token}' in name
           for token in ('pos_embed', 'patch_embed', 'mask_token', 'cls_token', 'register_tokens')):
      layer_id = 0
    elif '.blocks.' in name:
      layer_id = int(name[name.find('.blocks.'):].split('.')[2]) + 1
  return lr_decay_rate**(num_layers + 1 - layer_id)


def test_layerwise_decay_and_patch_embed_multiplier_are_dinov2s():
  config = dinov2_config()
  config.objective.ibot.separate_head = True
  _, params = step.build_graphdef(config, in_channels=1)
  factors = optim.lr_multipliers(params, 0.9, 0.2)
  for path, factor in jax.tree_util.tree_leaves_with_path(factors):
    name = '.'.join(str(optim._key_name(entry)) for entry in path)  # pylint: disable=protected-access
    expected = dinov2_lr_decay_rate(name, 0.9, 2) * (0.2 if 'patch_embed' in name else 1.0)
    assert factor == pytest.approx(expected), name
  assert factors['head']['prototypes'] == 1.0 and factors['backbone']['blocks'][0]['norm1'][
      'scale'] == pytest.approx(0.81)


def test_sqrt_scaling_and_the_multipliers_reach_the_update():
  config = tiny_config()
  config.optim.update(lr_scaling='sqrt_wrt_1024', warmup_epochs=0, layerwise_decay=0.5)
  config.batch_size = 256
  schedules = schedules_lib.make_schedules(config, 10)
  assert float(schedules.learning_rate(0)) == pytest.approx(config.optim.lr * 0.5)
  _, params = step.build_graphdef(config, in_channels=1)
  params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), params)
  optimizer = optim.make_optimizer(config.optim, schedules)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  # Adam's first step is lr * sign(grad); block 0 of 2 decays by 0.5 ** 2.
  np.testing.assert_allclose(updates['backbone']['blocks'][0]['attn']['qkv']['kernel'],
                             -0.25 * config.optim.lr * 0.5,
                             rtol=1e-3)
  np.testing.assert_allclose(updates['head']['layers'][0]['kernel'],
                             -config.optim.lr * 0.5,
                             rtol=1e-3)


def test_dinov2s_teacher_temperature_ramp_and_module_clipping():
  config = tiny_config()
  config.objective.update(teacher_temp_warmup='per_step',
                          warmup_teacher_temp=0.04,
                          teacher_temp=0.07,
                          warmup_teacher_temp_epochs=3)
  ramp = schedules_lib.make_schedules(config, 10).teacher_temp
  # dinov2/utils/utils.py:CosineScheduler with base = final = 0.07: np.linspace over the warm-up.
  np.testing.assert_allclose([float(ramp(step)) for step in range(35)],
                             np.concatenate([np.linspace(0.04, 0.07, 30),
                                             np.full(5, 0.07)]),
                             rtol=1e-6)
  grads = {
      'backbone': {
          'a': jnp.full((4,), 3.0),
          'b': jnp.full((9,), 2.0)
      },
      'head': {
          'c': jnp.full((4,), 0.1)
      }
  }
  clipped, _ = optim.clip_by_module_norm(3.0).update(grads, optax.EmptyState())
  # torch.nn.utils.clip_grad_norm_ on each module: the backbone's norm 8.49 -> 3, the head's kept.
  backbone_norm = np.sqrt(4 * 9 + 9 * 4)
  np.testing.assert_allclose(clipped['backbone']['a'],
                             3.0 * 3.0 / (backbone_norm + 1e-6),
                             rtol=1e-6)
  np.testing.assert_allclose(clipped['head']['c'], 0.1, rtol=1e-6)
