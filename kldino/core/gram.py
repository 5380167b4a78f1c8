"""DINOv3's Gram anchoring in the train step (dinov3/train/ssl_meta_arch.py, train.py): the loss
weight's schedule, when the Gram teacher is copied from the EMA teacher, and its patch features.

The Gram teacher is a frozen copy of the EMA teacher's backbone parameters held in the train state
(`TrainState.gram_teacher`, None without Gram anchoring). It becomes the EMA teacher once
`gram.start_step` steps are done (unless `gram.ckpt` gave the first one) and again every
`gram.refresh_every` steps after (at most `gram.max_refreshes` times), inside the jitted step: a
select on the step count, as DINOv3 copies after the EMA update of the iteration that completes
a multiple of its update frequency. The loss counts from `gram.start_step` on, its weight rising
along DINOv3's cosine over `gram.ramp_steps`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from kldino.core import schedules
from kldino.models import forward
from kldino.models.layers import resize_patch_grid


def used(config) -> bool:
  return bool(config.gram.use)


def loss_weight(gram_config) -> Callable:
  """step -> the loss weight: 0 before gram.start_step, then DINOv3's half cosine from 0 to
  gram.loss_weight over gram.ramp_steps (its loss_weight_schedule: linspace(0, pi, C), so the
  weight arrives at the ramp's last step), then gram.loss_weight."""
  start, weight, ramp = gram_config.start_step, gram_config.loss_weight, gram_config.ramp_steps
  rising = schedules.cosine_interpolation(0.0, weight, ramp - 1) if ramp else (lambda _: weight)

  def schedule(step):
    return jnp.where(step >= start, rising(jnp.asarray(step) - start), 0.0)

  return schedule


def refresh_due(gram_config, steps_done):
  """Whether the Gram teacher becomes the EMA teacher once `steps_done` steps are done: at
  gram.start_step (unless gram.ckpt gave the first Gram teacher), then every gram.refresh_every
  steps, at most gram.max_refreshes times (0: no limit)."""
  since = jnp.asarray(steps_done) - gram_config.start_step
  due = jnp.logical_and(since == 0, not gram_config.ckpt)
  every, most = gram_config.refresh_every, gram_config.max_refreshes
  if every:
    periodic = (since > 0) & (since % every == 0)
    if most:
      periodic &= since // every <= most
    due |= periodic
  return due


def refreshed(gram_config, gram_teacher, teacher, steps_done):
  """The Gram teacher after the step that brings the count to `steps_done`: the EMA teacher's
  backbone when a refresh is due, else as it was."""
  due = refresh_due(gram_config, steps_done)
  return jax.tree.map(lambda new, old: jnp.where(due, new, old), teacher['backbone'], gram_teacher)


def teacher_patches(graphdef, config, teacher, gram_teacher, crops, student_side: int):
  """The Gram teacher's patch features of its crops [B, G, S, S, C] (unmasked, after the final
  norm), [B * G, P, D], resized to the student's grid of `student_side`^2 patches when theirs
  differs (torch's interpolate, gram.resize_method / resize_antialias, align_corners=False)."""
  images = crops.reshape(-1, *crops.shape[2:])
  tokens = forward.patch_tokens(graphdef, {**teacher, 'backbone': gram_teacher}, images)
  return resize_patch_grid(tokens,
                           student_side,
                           method=config.gram.resize_method,
                           antialias=config.gram.resize_antialias)
