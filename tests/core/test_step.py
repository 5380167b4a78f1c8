"""The train step: 8 simulated devices (data and FSDP) match 1 device; freezing; EMA."""
import jax
import numpy as np
import pytest

from kldino.core import program as program_lib
from kldino.core import sharding
from kldino.core import step
from tests.helpers import dinov2_config, random_batch, tiny_config

STEPS_PER_EPOCH = 10


def run_steps(config, devices, num_steps=2, fsdp=1):
  config = config.copy_and_resolve_references()
  config.mesh.fsdp = fsdp
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  graphdef, _ = step.build_graphdef(config, in_channels=1)
  program = program_lib.build(config, graphdef, 1, mesh, STEPS_PER_EPOCH)
  train_step, shardings = program.train_step, program.state_shardings
  state = program.init(config.seed)
  initial = jax.device_get(state)
  metrics = []
  for i in range(num_steps):
    state, m = train_step(state, sharding.global_batch(random_batch(config, seed=i), mesh))
    metrics.append(m)
  return initial, jax.device_get(state), jax.device_get(metrics), shardings


def assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize('normalization, source', [('prior', 'batch'), ('center', 'sweep'),
                                                   ('sinkhorn', 'sweep'), ('teacher_bn', 'sweep')])
def test_eight_devices_match_one(normalization, source):
  config = tiny_config()
  config.objective.normalization = normalization
  config.objective.prior_source = source
  _, one, metrics_one, _ = run_steps(config, jax.devices()[:1])
  _, eight, metrics_eight, _ = run_steps(config, jax.devices()[:8])
  assert_trees_close(one.student, eight.student)
  assert_trees_close(one.teacher, eight.teacher)
  assert_trees_close(one.norm_state, eight.norm_state)
  assert_trees_close(metrics_one, metrics_eight, rtol=1e-3)
  # The step moved the parameters (the comparison is not between two untouched states).
  assert int(eight.step) == 2


def test_fsdp_matches_one_device_and_shards_the_state():
  config = tiny_config()
  config.objective.normalization = 'center'
  _, one, metrics_one, _ = run_steps(config, jax.devices()[:1])
  _, fsdp, metrics_fsdp, shardings = run_steps(config, jax.devices()[:8], fsdp=4)
  assert_trees_close(one.student, fsdp.student)
  assert_trees_close(one.opt_state, fsdp.opt_state)
  assert_trees_close(metrics_one, metrics_fsdp, rtol=1e-3)
  kernel_spec = shardings.student['head']['prototypes'].spec
  assert 'fsdp' in tuple(kernel_spec), kernel_spec


def test_prototypes_frozen_during_first_epoch_then_learn():
  config = tiny_config()
  config.optim.freeze_prototypes_epochs = 1
  initial, state, _, _ = run_steps(config, jax.devices()[:1], num_steps=2)
  np.testing.assert_array_equal(initial.student['head']['prototypes'],
                                state.student['head']['prototypes'])
  assert not np.allclose(initial.student['backbone']['cls_token'],
                         state.student['backbone']['cls_token'])
  config.optim.freeze_prototypes_epochs = 0
  initial, state, _, _ = run_steps(config, jax.devices()[:1], num_steps=2)
  assert not np.allclose(initial.student['head']['prototypes'], state.student['head']['prototypes'])


def test_fixed_prototypes_never_learn():
  config = tiny_config(prototypes='fixed')
  initial, state, _, _ = run_steps(config, jax.devices()[:1], num_steps=2)
  np.testing.assert_array_equal(initial.student['head']['prototypes'],
                                state.student['head']['prototypes'])


def test_teacher_is_ema_of_student():
  config = tiny_config()
  config.optim.teacher_momentum = 0.9
  config.optim.teacher_momentum_end = 0.9
  initial, state, metrics, _ = run_steps(config, jax.devices()[:1], num_steps=1)
  expected = jax.tree.map(lambda t, s: 0.9 * t + 0.1 * s, initial.teacher, state.student)
  assert_trees_close(state.teacher, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics[0]['teacher_momentum'], 0.9, rtol=1e-6)


@pytest.mark.parametrize('patch_normalization, separate_head',
                         [('center', False), ('sinkhorn', True), ('prior', False)])
def test_dinov2_objective_on_eight_devices_matches_one(patch_normalization, separate_head):
  """iBOT (masked patches gathered to the static bound) and KoLeo: the global batch's terms,
  whatever the devices; every term moves the student."""
  config = dinov2_config(patch_normalization=patch_normalization, prior_source='batch')
  config.objective.ibot.separate_head = separate_head
  initial, one, metrics_one, _ = run_steps(config, jax.devices()[:1])
  _, eight, metrics_eight, _ = run_steps(config, jax.devices()[:8])
  assert_trees_close(one.student, eight.student)
  assert_trees_close(one.norm_state, eight.norm_state)
  assert_trees_close(metrics_one, metrics_eight, rtol=1e-3)
  for metrics in metrics_one:
    assert metrics['ibot_loss'] > 0 and np.isfinite(metrics['koleo_loss'])
    np.testing.assert_allclose(metrics['loss'],
                               metrics['dino_loss'] + metrics['ibot_loss'] +
                               0.1 * metrics['koleo_loss'],
                               rtol=1e-5)
  assert not np.allclose(initial.student['backbone']['mask_token'],
                         one.student['backbone']['mask_token'])
  assert ('patch_head' in one.student) == separate_head


def test_koleo_alone_adds_its_term():
  config = tiny_config()
  config.objective.koleo_weight = 0.5
  _, _, metrics, _ = run_steps(config, jax.devices()[:1], num_steps=1)
  assert 'ibot_loss' not in metrics[0] and metrics[0]['koleo_loss'] > 0
  np.testing.assert_allclose(metrics[0]['loss'],
                             metrics[0]['dino_loss'] + 0.5 * metrics[0]['koleo_loss'],
                             rtol=1e-6)
