"""The train state and the jitted train step.

One step: teacher logits of the global views -> normalised targets -> multi-crop cross-entropy of
the student -> AdamW update -> EMA teacher -> normalisation-state update -> metrics. The program
builder (kldino/core/program.py) jits it with explicit shardings over the mesh, donating its state.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kldino.models import forward
from kldino.core import objective
from kldino.core import optim
from kldino.models import build_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  student: Any  # pure dict of parameters
  teacher: Any  # EMA of the student, same structure
  opt_state: Any
  norm_state: dict  # {'log_prior': [K], 'center': [K]}
  rng: jax.Array  # root key; step s uses fold_in(rng, s), so resuming needs no RNG state


def build_graphdef(config, in_channels: int):
  """The model's static structure and abstract parameters, without allocating anything."""
  abstract_model = nnx.eval_shape(lambda: build_model(
      config.model, in_channels=in_channels, image_size=config.aug.global_size, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  return graphdef, nnx.to_pure_dict(abstract_params)


def make_init_fn(config, in_channels: int, optimizer):

  def init(seed):
    key = jax.random.PRNGKey(seed)
    model_key, step_key = jax.random.split(key)
    model = build_model(config.model,
                        in_channels=in_channels,
                        image_size=config.aug.global_size,
                        rngs=nnx.Rngs(params=model_key))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return TrainState(step=jnp.zeros((), jnp.int32),
                      student=params,
                      teacher=params,
                      opt_state=optimizer.init(params),
                      norm_state=objective.init_norm_state(config.model.num_prototypes),
                      rng=step_key)

  return init


def make_train_step(graphdef, config, schedules, optimizer):
  normalization = objective.get_normalization(config.objective)
  standardise = normalization.standardise_teacher_embedding
  objective_config = config.objective
  frozen_steps = config.optim.freeze_prototypes_epochs * schedules.steps_per_epoch
  fixed_prototypes = config.model.prototypes == 'fixed'

  def train_step(state: TrainState, batch):
    step = state.step
    teacher_temp = schedules.teacher_temp(step)
    teacher_logits = jax.lax.stop_gradient(
        forward.teacher_view_logits(graphdef,
                                    state.teacher,
                                    batch['global_crops'],
                                    standardise=standardise))
    batch_size, num_global, num_prototypes = teacher_logits.shape
    flat_teacher_logits = teacher_logits.reshape(batch_size * num_global, num_prototypes)
    targets = normalization.targets(flat_teacher_logits, state.norm_state, teacher_temp)
    drop_key = jax.random.fold_in(state.rng, step)

    def loss_fn(student_params):
      student_logits = forward.student_view_logits(graphdef, student_params, batch['global_crops'],
                                                   batch['local_crops'], drop_key)
      return objective.multicrop_cross_entropy(targets.reshape(teacher_logits.shape),
                                               student_logits, objective_config.student_temp)

    loss, grads = jax.value_and_grad(loss_fn)(state.student)
    # DINO cancels the prototypes' gradient in epoch 0 (PyTorch's AdamW then skips them: no
    # step count, moments or weight decay; kldino/core/optim.py); 'fixed' prototypes never learn.
    frozen = jnp.logical_or(fixed_prototypes, step < frozen_steps)
    grads = optim.zero_prototypes(grads, frozen)  # a frozen parameter has no gradient
    student, opt_state = optim.apply_gradients(optimizer, state.student, state.opt_state, grads,
                                               frozen)
    momentum = schedules.teacher_momentum(step)
    teacher = optax.incremental_update(student, state.teacher, 1.0 - momentum)
    norm_state = normalization.update(state.norm_state, flat_teacher_logits, teacher_temp)

    diagnostics = objective.target_diagnostics(flat_teacher_logits, targets, teacher_temp)
    prior_entropy = objective.entropy(jnp.exp(norm_state['log_prior']))
    metrics = {
        'loss': loss,
        'kl': loss - diagnostics['target_entropy'],
        **diagnostics,
        'prior_effective_clusters': jnp.exp(prior_entropy),
        'grad_norm': optax.tree.norm(grads),
        'lr': schedules.learning_rate(step),
        'weight_decay': schedules.weight_decay(step),
        'teacher_momentum': momentum,
        'teacher_temp': teacher_temp,
    }
    # A non-finite loss or gradient leaves the state as it was (the step still counts): no
    # non-finite value ever reaches the state or a checkpoint, without a host sync per step;
    # the loop stops at its next log or checkpoint step (metrics['finite'], kldino/train.py).
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
    student, teacher, opt_state, norm_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (student, teacher, opt_state, norm_state),
        (state.student, state.teacher, state.opt_state, state.norm_state))
    metrics['finite'] = finite
    new_state = state.replace(step=step + 1,
                              student=student,
                              teacher=teacher,
                              opt_state=opt_state,
                              norm_state=norm_state)
    return new_state, metrics

  return train_step
