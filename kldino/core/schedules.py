"""DINO's per-iteration schedules: lr, weight decay, teacher momentum, teacher temperature.

All are functions of the global step (traceable, so the jitted step evaluates them itself and no
host value is fed per step).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp
import optax


def cosine_interpolation(start: float, end: float, num_steps: int) -> Callable:
  """start -> end along half a cosine over num_steps, then end (DINO's cosine_scheduler)."""

  def schedule(step):
    progress = jnp.clip(step / max(num_steps, 1), 0.0, 1.0)
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))

  return schedule


def epoch_warmup_then_constant(start: float, end: float, warmup_epochs: int,
                               steps_per_epoch: int) -> Callable:
  """DINO's teacher-temperature schedule: constant within an epoch, linspace(start, end,
  warmup_epochs)[epoch] during the warm-up (so `end` in its last epoch), then `end`."""

  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    fraction = jnp.minimum(epoch / max(warmup_epochs - 1, 1), 1.0)
    return jnp.where(epoch < warmup_epochs, start + (end - start) * fraction, end)

  return schedule


def step_warmup_then_constant(start: float, end: float, warmup_steps: int) -> Callable:
  """DINOv2's teacher-temperature schedule: linspace(start, end, warmup_steps) over the first
  steps (so `end` at the last of them), then `end` (its CosineScheduler with a warm-up only)."""

  def schedule(step):
    fraction = jnp.minimum(jnp.asarray(step) / max(warmup_steps - 1, 1), 1.0)
    return jnp.where(jnp.asarray(step) < warmup_steps, start + (end - start) * fraction, end)

  return schedule


@dataclasses.dataclass(frozen=True)
class Schedules:
  learning_rate: Callable
  weight_decay: Callable
  teacher_momentum: Callable
  teacher_temp: Callable
  total_steps: int
  steps_per_epoch: int


# optim.lr_scaling: how optim.lr scales with the global batch.
LR_SCALINGS = {
    'linear_wrt_256': lambda batch: batch / 256.0,  # DINO's: optim.lr is per 256 images
    'sqrt_wrt_1024': lambda batch: math.sqrt(batch / 1024.0),  # DINOv2's and DINOv3's
}


def make_schedules(config, steps_per_epoch: int) -> Schedules:
  optim, objective = config.optim, config.objective
  total_steps = config.num_epochs * steps_per_epoch
  peak_lr = optim.lr * LR_SCALINGS[optim.lr_scaling](config.batch_size)
  warmup_steps = min(optim.warmup_epochs * steps_per_epoch, total_steps)
  learning_rate = optax.warmup_cosine_decay_schedule(init_value=0.0,
                                                     peak_value=peak_lr,
                                                     warmup_steps=warmup_steps,
                                                     decay_steps=max(total_steps, warmup_steps + 1),
                                                     end_value=optim.min_lr)
  return Schedules(
      learning_rate=learning_rate,
      weight_decay=cosine_interpolation(optim.weight_decay, optim.weight_decay_end, total_steps),
      teacher_momentum=cosine_interpolation(optim.teacher_momentum, optim.teacher_momentum_end,
                                            total_steps),
      teacher_temp=(epoch_warmup_then_constant(
          objective.warmup_teacher_temp, objective.teacher_temp,
          objective.warmup_teacher_temp_epochs, steps_per_epoch)
                    if objective.teacher_temp_warmup == 'per_epoch' else step_warmup_then_constant(
                        objective.warmup_teacher_temp, objective.teacher_temp,
                        objective.warmup_teacher_temp_epochs * steps_per_epoch)),
      total_steps=total_steps,
      steps_per_epoch=steps_per_epoch,
  )
