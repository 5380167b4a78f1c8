"""The one program builder: for a config on a mesh, the schedules, the optimizer, the jitted init
(into the state's shardings), the jitted train step and the jitted prior-pass functions.

Training (kldino/train.py), the benchmark (kldino/tools/bench.py), the plan (kldino/modes/plan.py)
and the weight import (kldino/modes/import_dino.py) all build their programs here, so that what
they measure, plan or write is what training runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kldino.core import objective
from kldino.core import optim
from kldino.core import prior_pass
from kldino.core import schedules as schedules_lib
from kldino.core import sharding
from kldino.core import step as step_lib
from kldino.data import gram_crops


@dataclasses.dataclass(frozen=True)
class Program:
  schedules: schedules_lib.Schedules
  init: Callable[[int], step_lib.TrainState]  # seed -> the state, placed in its shardings
  state_shardings: step_lib.TrainState  # NamedSharding leaves
  abstract_state: step_lib.TrainState  # jax.ShapeDtypeStruct leaves with their shardings
  train_step: Any  # jitted (state, batch) -> (state, metrics); donates the state
  prior_pass: prior_pass.PassFns  # jitted accumulations of a prior pass


def abstract_train_batch(config, in_channels: int, mesh) -> dict:
  """The train step's batch as abstract arrays sharded over `mesh` (to compile without data):
  global_crops [B, 2, G, G, C] and local_crops [B, L, l, l, C], float32; with iBOT, masks
  [B, 2, patches] bool; with DINOv3's Gram teacher crops, gram_crops [B, 2, S, S, C] float32."""
  aug, batch = config.aug, config.batch_size
  shapes = {
      'global_crops': ((batch, 2, aug.global_size, aug.global_size, in_channels), jnp.float32),
      'local_crops': (
          (batch, aug.num_local, aug.local_size, aug.local_size, in_channels), jnp.float32)
  }
  if objective.uses_ibot(config.objective):
    shapes['masks'] = ((batch, 2, (aug.global_size // config.model.patch_size)**2), jnp.bool_)
  if size := gram_crops.size(config):
    shapes['gram_crops'] = ((batch, 2, size, size, in_channels), jnp.float32)
  return {
      name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh))
      for name, (shape, dtype) in shapes.items()
  }


def build(config, graphdef, in_channels: int, mesh, steps_per_epoch: int) -> Program:
  """The program of `config` with `steps_per_epoch` (the schedules' unit) on `mesh`."""
  schedules = schedules_lib.make_schedules(config, steps_per_epoch)
  optimizer = optim.make_optimizer(config.optim, schedules)
  init_fn = step_lib.make_init_fn(config, in_channels, optimizer)
  shape_state = jax.eval_shape(init_fn, 0)
  state_shardings = sharding.state_shardings(shape_state, mesh, config.mesh.fsdp_min_size)
  abstract_state = jax.tree.map(
      lambda leaf, leaf_sharding: jax.ShapeDtypeStruct(
          leaf.shape, leaf.dtype, sharding=leaf_sharding), shape_state, state_shardings)
  train_step = jax.jit(step_lib.make_train_step(graphdef, config, schedules, optimizer,
                                                mesh.devices.size),
                       in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(state_shardings, sharding.replicated(mesh)),
                       donate_argnums=(0,))
  standardise = objective.get_normalization(config.objective).standardise_teacher_embedding
  patch_standardise = (objective.get_patch_normalization(
      config.objective).standardise_teacher_embedding
                       if objective.uses_ibot(config.objective) else None)
  return Program(schedules=schedules,
                 init=jax.jit(init_fn, static_argnums=0, out_shardings=state_shardings),
                 state_shardings=state_shardings,
                 abstract_state=abstract_state,
                 train_step=train_step,
                 prior_pass=prior_pass.jit_pass_fns(graphdef, standardise, state_shardings.teacher,
                                                    mesh, patch_standardise))
