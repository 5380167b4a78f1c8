"""Scale-out configs and FSDP: every pod / GPU config builds abstractly, and FSDP really divides
the per-device state on 8 simulated devices (XLA's memory analysis of the compiled step)."""

import jax
import jax.numpy as jnp
import pytest

from kldino.core import program as program_lib
from kldino.core import optim
from kldino.core import schedules
from kldino.core import sharding
from kldino.core import step
from kldino.config.checks import validate_config
from tests.helpers import config_module

SCALE = config_module('imagenet_scale')
BACKBONE_PARAMS = {
    'vit_s16': 21.7e6,
    'vit_b16': 85.8e6,
    'vit_l16': 303.3e6,
    'dinov2_vitl16': 303.3e6,
    'dinov3_vitl16': 303.1e6,  # no position table (RoPE)
    'dinov3_vitl16_prior': 303.1e6,
}
# The global batch on the pods: DINO's 1024, DINOv2's and DINOv3's 2048.
POD_BATCH = {'dinov2_vitl16': 2048, 'dinov3_vitl16': 2048, 'dinov3_vitl16_prior': 2048}


def _state_bytes(tree):
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def _abstract_train_step(config, batch_size, num_local):
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  config.objective.koleo_group_size = 0  # the traced batch is smaller than the recipe's groups
  scheds = schedules.make_schedules(config, 1000)
  optimizer = optim.make_optimizer(config.optim, scheds)
  graphdef, abstract_params = step.build_graphdef(config, in_channels=3)
  init_fn = step.make_init_fn(config, 3, optimizer)
  abstract_state = jax.eval_shape(init_fn, 0)
  train_step = step.make_train_step(graphdef, config, scheds, optimizer)
  batch = {
      'global_crops': jax.ShapeDtypeStruct((batch_size, 2, 224, 224, 3), jnp.float32),
      'local_crops': jax.ShapeDtypeStruct((batch_size, num_local, 96, 96, 3), jnp.float32)
  }
  if config.objective.ibot.loss_weight:
    batch['masks'] = jax.ShapeDtypeStruct((batch_size, 2, 196), jnp.bool_)
  return train_step, init_fn, abstract_state, abstract_params, batch


@pytest.mark.parametrize('model', sorted(SCALE.MODELS))
def test_every_hardware_config_builds_and_fits(model):
  built = False
  for hardware_name, hardware in SCALE.HARDWARE.items():
    config = SCALE.get_config(f'{model},{hardware_name}')
    devices, hosts = hardware['devices'], hardware['hosts']
    validate_config(config, num_devices=devices, num_processes=hosts)
    assert config.model.compute_dtype == 'bfloat16'
    assert config.data.data_dir.startswith('gs://') and config.data.name == 'imagenet2012'
    assert devices % config.mesh.fsdp == 0 and config.batch_size % devices == 0
    assert config.batch_size == (64 * devices if hardware['kind'] == 'gpu' else POD_BATCH.get(
        model, 1024))
    mesh = jax.sharding.AbstractMesh((devices // config.mesh.fsdp, config.mesh.fsdp),
                                     sharding.BATCH_AXES)
    assert mesh.size == devices
    if not built:  # the model is the same on every hardware: trace it once
      train_step, _, abstract_state, params, batch = _abstract_train_step(config, 2, 1)
      new_state, metrics = jax.eval_shape(train_step, abstract_state, batch)
      assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new_state.student))
      assert metrics['loss'].dtype == jnp.float32
      backbone = sum(leaf.size for leaf in jax.tree.leaves(params['backbone']))
      assert abs(backbone - BACKBONE_PARAMS[model]) / BACKBONE_PARAMS[model] < 0.01, backbone
      state_bytes, built = _state_bytes(abstract_state), True
    # Parameters, teacher and two Adam moments, split over the FSDP group, take at most a
    # quarter of a device's memory: the rest is for activations.
    assert state_bytes / config.mesh.fsdp < hardware['memory'] * 2**30 / 4, hardware_name


def test_fsdp_on_8_devices_holds_an_eighth_of_the_state():
  config = config_module('imagenet_vit_s16').get_config()
  config.mesh.fsdp = 8
  train_step, _, abstract_state, _, batch = _abstract_train_step(config, 8, 0)
  mesh = sharding.make_mesh(config.mesh)
  graphdef, _ = step.build_graphdef(config, in_channels=3)
  program = program_lib.build(config, graphdef, 3, mesh, 1000)
  batch = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(
          leaf.shape, leaf.dtype, sharding=sharding.batch_sharding(mesh)), batch)
  memory = program.train_step.lower(program.abstract_state, batch).compile().memory_analysis()
  replicated_per_device = _state_bytes(abstract_state)  # ViT-S/16 + K=65536 head: ~704 MB
  assert replicated_per_device > 600e6
  # Arguments per device: the state shard plus 1 image of the batch.
  assert memory.argument_size_in_bytes <= 1.15 * replicated_per_device / 8, (
      memory.argument_size_in_bytes, replicated_per_device / 8)
  assert memory.output_size_in_bytes <= 1.15 * replicated_per_device / 8
