"""DINOv3's Gram anchoring: the loss and the features' resize against the PyTorch transcription
(tests/torch_dinov3_losses.py), the weight schedule against DINOv3's, and the Gram teacher's
refreshes in the train step."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from kldino.core import gram
from kldino.core import objective
from kldino.core import program as program_lib
from kldino.core import sharding
from kldino.core import step as step_lib
from kldino.models.layers import resize_patch_grid
from tests import torch_dinov3_losses
from tests.core.test_step import STEPS_PER_EPOCH, assert_trees_close, run_steps
from tests.helpers import dinov2_config, random_batch, tiny_config

RNG = np.random.default_rng(0)


def _patches(crops=6, patches=9, dim=5):
  return [RNG.standard_normal((crops, patches, dim)).astype(np.float32) for _ in range(2)]


@pytest.mark.parametrize('normalized, img_level, remove_neg, remove_only_teacher_neg', [
    (True, True, False, False),
    (True, False, False, False),
    (False, True, False, False),
    (True, True, True, False),
    (True, False, False, True),
])
def test_gram_loss_and_its_gradient_equal_dinov3s(normalized, img_level, remove_neg,
                                                  remove_only_teacher_neg):
  student, teacher = _patches()
  reference = torch.from_numpy(student).requires_grad_()
  expected = torch_dinov3_losses.gram_loss(reference,
                                           torch.from_numpy(teacher),
                                           apply_norm=normalized,
                                           img_level=img_level,
                                           remove_neg=remove_neg,
                                           remove_only_teacher_neg=remove_only_teacher_neg)
  expected.backward()
  loss = lambda s: objective.gram_loss(s,
                                       jnp.asarray(teacher),
                                       normalized=normalized,
                                       group=0 if img_level else len(student),
                                       remove_neg=remove_neg,
                                       remove_only_teacher_neg=remove_only_teacher_neg)
  got, gradient = jax.value_and_grad(loss)(jnp.asarray(student))
  np.testing.assert_allclose(float(got), float(expected.detach()), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gradient), reference.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_gram_loss_over_groups_is_the_mean_of_each_groups():
  student, teacher = _patches()
  groups = [
      objective.gram_loss(jnp.asarray(student[i:i + 2]), jnp.asarray(teacher[i:i + 2]), group=2)
      for i in range(0, 6, 2)
  ]
  whole = objective.gram_loss(jnp.asarray(student), jnp.asarray(teacher), group=2)
  np.testing.assert_allclose(float(whole), np.mean(groups), rtol=1e-6)


@pytest.mark.parametrize('method', ['bicubic', 'bilinear'])
@pytest.mark.parametrize('antialias', [False, True])
@pytest.mark.parametrize('in_side, out_side', [(8, 4), (6, 4), (4, 7)])
def test_patch_grid_resize_equals_torchs_interpolate(method, antialias, in_side, out_side):
  tokens = RNG.standard_normal((3, in_side * in_side, 5)).astype(np.float32)
  expected = torch_dinov3_losses.resize_gram_teacher_patches(torch.from_numpy(tokens),
                                                             out_side,
                                                             mode=method,
                                                             antialias=antialias)
  got = resize_patch_grid(jnp.asarray(tokens), out_side, method=method, antialias=antialias)
  np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-5, atol=1e-5)


def _dinov3_weights(start, peak, end, warmup, total, cosine):
  """dinov3/train/cosine_lr_scheduler.py:linear_warmup_cosine_decay, transcribed."""
  linear = np.linspace(start, peak, warmup, endpoint=False)
  rising = (peak - end) * (np.cos(np.linspace(0, np.pi, cosine)) + 1) / 2 + end
  return np.concatenate([linear, rising, np.full(total - warmup - cosine, end)])


def _gram_config(**overrides):
  config = ml_collections.ConfigDict(
      dict(loss_weight=2.0, ramp_steps=0, start_step=0, refresh_every=0, max_refreshes=0, ckpt=''))
  config.update(overrides)
  return config


@pytest.mark.parametrize('ramp', [0, 1, 7])
def test_loss_weight_is_dinov3s_schedule_from_the_start_step(ramp):
  # DINOv3's Gram anchoring: 0 for its warm-up, then a cosine from 0 to the weight.
  expected = _dinov3_weights(0.0, 0.0, 2.0, 10, 30, ramp)
  schedule = gram.loss_weight(_gram_config(start_step=10, ramp_steps=ramp))
  np.testing.assert_allclose([float(schedule(step)) for step in range(30)], expected, atol=1e-6)


def _dinov3_refreshes(first, every, most, total):
  """The iterations whose end copies the EMA teacher (dinov3/train/train.py's rule), as step
  counts: it + 1 >= first and (it + 1) % every == 0, at most `most` times."""
  counts, done = [], 0
  for it in range(total):
    if it + 1 >= first and (it + 1) % every == 0 and (most is None or done < most):
      counts.append(it + 1)
      done += 1
  return counts


def test_refreshes_follow_dinov3s_rule():
  # DINOv3 counts from iteration 0, a Gram teacher from a checkpoint; kldino from start_step.
  config = _gram_config(start_step=0, refresh_every=5, max_refreshes=3, ckpt='elsewhere')
  due = [count for count in range(1, 40) if gram.refresh_due(config, count)]
  assert due == _dinov3_refreshes(5, 5, 3, 40) == [5, 10, 15]
  config = _gram_config(start_step=4, refresh_every=5)
  due = [count for count in range(1, 20) if gram.refresh_due(config, count)]
  assert due == [4, 9, 14, 19]  # the first copy at start_step, then every 5 steps


def _gram_run(config, num_steps):
  config.gram.use = True
  return run_steps(config, jax.devices()[:1], num_steps=num_steps)


def _states_after_each_step(config, num_steps):
  """[(state, metrics)] after steps 1..num_steps of one program on one device, and the initial
  state."""
  config.gram.use = True
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  graphdef, _ = step_lib.build_graphdef(config, in_channels=1)
  program = program_lib.build(config, graphdef, 1, mesh, STEPS_PER_EPOCH)
  state = program.init(config.seed)
  initial, states = jax.device_get(state), []
  for i in range(num_steps):
    state, metrics = program.train_step(state,
                                        sharding.global_batch(random_batch(config, seed=i), mesh))
    states.append(jax.device_get((state, metrics)))
  return initial, states


def _equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_gram_teacher_is_the_ema_teacher_after_each_refresh_and_frozen_between():
  config = tiny_config()
  config.gram.start_step, config.gram.refresh_every = 2, 2
  initial, states = _states_after_each_step(config, 5)
  before = initial.gram_teacher
  for count, (state, metrics) in enumerate(states, start=1):
    refreshed = count in (2, 4)
    assert _equal(state.gram_teacher, state.teacher['backbone']) == refreshed, count
    if not refreshed:  # unchanged since the step before
      assert _equal(state.gram_teacher, before), count
    before = state.gram_teacher
    # The loss counts from start_step: its metric and weight are 0 before.
    assert (metrics['gram_weight'] > 0) == (count > 2) == (metrics['gram_loss'] > 0), count


def test_the_gram_loss_moves_the_student():
  config = tiny_config()
  _, plain, _, _ = run_steps(config, jax.devices()[:1], num_steps=2)
  _, anchored, metrics, _ = _gram_run(config, 2)
  assert metrics[1]['gram_loss'] > 0
  assert not np.array_equal(plain.student['backbone']['patch_embed']['kernel'],
                            anchored.student['backbone']['patch_embed']['kernel'])
  assert plain.gram_teacher is None


@pytest.mark.parametrize('img_level', [True, False])
def test_gram_on_eight_devices_matches_one(img_level):
  config = dinov2_config()
  config.gram.use, config.gram.img_level, config.gram.group_size = True, img_level, 2
  config.gram.teacher_resolution_scale = 1.5  # 24 px crops, 6 x 6 patches resized to 4 x 4
  _, one, metrics_one, _ = run_steps(config, jax.devices()[:1])
  _, eight, metrics_eight, _ = run_steps(config, jax.devices()[:8])
  assert_trees_close(one.student, eight.student)
  assert_trees_close(one.gram_teacher, eight.gram_teacher)
  assert_trees_close(metrics_one, metrics_eight, rtol=1e-3)
  assert math.isfinite(float(metrics_one[-1]['gram_loss']))
