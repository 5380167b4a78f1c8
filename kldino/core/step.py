"""The train state and the jitted train step.

One step: teacher logits of the global views -> normalised targets -> multi-crop cross-entropy of
the student (with iBOT, also the masked patches' targets and cross-entropy; with KoLeo, its term;
with Gram anchoring, the Gram teacher's patch features and the Gram loss) -> AdamW update -> EMA
teacher -> Gram teacher refresh -> normalisation-state update -> metrics. The program builder
(kldino/core/program.py) jits it with explicit shardings over the mesh, donating its state.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kldino.models import forward
from kldino.core import gram as gram_lib
from kldino.core import objective
from kldino.core import optim
from kldino.data import gram_crops
from kldino.data import masking
from kldino.models import build_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  student: Any  # pure dict of parameters
  teacher: Any  # EMA of the student, same structure
  opt_state: Any
  norm_state: dict  # {'log_prior': [K], 'center': [K]}
  rng: jax.Array  # root key; step s uses fold_in(rng, s), so resuming needs no RNG state
  # DINOv3's Gram teacher: backbone parameters (kldino/core/gram.py); None without Gram anchoring,
  # so that the states (and checkpoints) of runs without it are what they were.
  gram_teacher: Any = None


def _separate_patch_head(config) -> bool:
  return objective.uses_ibot(config.objective) and config.objective.ibot.separate_head


def build_graphdef(config, in_channels: int):
  """The model's static structure and abstract parameters, without allocating anything."""
  abstract_model = nnx.eval_shape(
      lambda: build_model(config.model,
                          in_channels=in_channels,
                          image_size=config.aug.global_size,
                          rngs=nnx.Rngs(0),
                          separate_patch_head=_separate_patch_head(config)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  return graphdef, nnx.to_pure_dict(abstract_params)


def make_init_fn(config, in_channels: int, optimizer):

  def init(seed):
    key = jax.random.PRNGKey(seed)
    model_key, step_key = jax.random.split(key)
    model = build_model(config.model,
                        in_channels=in_channels,
                        image_size=config.aug.global_size,
                        rngs=nnx.Rngs(params=model_key),
                        separate_patch_head=_separate_patch_head(config))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return TrainState(step=jnp.zeros((), jnp.int32),
                      student=params,
                      teacher=params,
                      opt_state=optimizer.init(params),
                      norm_state=objective.init_norm_state(config.model.num_prototypes,
                                                           patches=objective.uses_ibot(
                                                               config.objective)),
                      rng=step_key,
                      gram_teacher=params['backbone'] if gram_lib.used(config) else None)

  return init


def _koleo_term(global_cls, group_size: int):
  """KoLeo of the student's global-crop CLS [B, G, D]: per crop (never between the two crops of
  one image) and per group of `group_size` images (0: the whole batch), summed over crops."""
  batch, views, dim = global_cls.shape
  groups = global_cls.reshape(-1, group_size or batch, views, dim)
  per_group = jax.vmap(jax.vmap(objective.koleo, in_axes=1))(groups)  # [groups, views]
  return jnp.sum(jnp.mean(per_group, axis=0))


def make_train_step(graphdef, config, schedules, optimizer, num_devices: int = 1):
  objective_config = config.objective
  normalization = objective.get_normalization(objective_config)
  standardise = normalization.standardise_teacher_embedding
  ibot = objective.uses_ibot(objective_config)
  patch_normalization = objective.get_patch_normalization(objective_config) if ibot else None
  group = masking.group_size(config, num_devices) if ibot else 0
  group_bound = masking.group_bound(config, group) if ibot else 0
  frozen_steps = config.optim.freeze_prototypes_epochs * schedules.steps_per_epoch
  fixed_prototypes = config.model.prototypes == 'fixed'
  gram = gram_lib.used(config)
  gram_weight = gram_lib.loss_weight(config.gram) if gram else None
  # img_level=False: the Gram matrix over the patches of a group of images (DINOv3's local batch).
  gram_group = 0 if config.gram.img_level else (config.gram.group_size or
                                                config.batch_size // num_devices)
  student_side = config.aug.global_size // config.model.patch_size

  def teacher_side(state, batch, teacher_temp, patches):
    """(image targets [B, G, K] and their flat teacher logits; with iBOT the patch targets
    [rows, K] and their teacher logits, else None)."""
    teacher_logits, patch_logits = jax.lax.stop_gradient(
        forward.teacher_view_outputs(graphdef,
                                     state.teacher,
                                     batch['global_crops'],
                                     patches,
                                     standardise=standardise,
                                     patch_standardise=ibot and
                                     patch_normalization.standardise_teacher_embedding))
    patch_targets = (patch_normalization.targets(patch_logits, state.norm_state['patch'],
                                                 teacher_temp, patches.valid) if ibot else None)
    flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    targets = normalization.targets(flat, state.norm_state, teacher_temp)
    return targets.reshape(teacher_logits.shape), flat, patch_targets, patch_logits

  def gram_targets(state, batch):
    """The Gram teacher's patch features [B * G, P, D] of the step, zeros (not computed) before
    gram.start_step."""
    crops = batch['gram_crops'] if gram_crops.size(config) else batch['global_crops']
    compute = lambda: jax.lax.stop_gradient(
        gram_lib.teacher_patches(graphdef, config, state.teacher, state.gram_teacher, crops,
                                 student_side))
    if not config.gram.start_step:
      return compute()
    shape = jax.eval_shape(compute)
    return jax.lax.cond(state.step >= config.gram.start_step, compute,
                        lambda: jnp.zeros(shape.shape, shape.dtype))

  def gram_term(student_patches, teacher_patches, step):
    """The Gram loss (0 before gram.start_step)."""
    group = gram_group * (student_patches.shape[0] // config.batch_size)  # crops per group
    loss = objective.gram_loss(student_patches,
                               teacher_patches,
                               normalized=config.gram.normalized,
                               group=group,
                               remove_neg=config.gram.remove_neg,
                               remove_only_teacher_neg=config.gram.remove_only_teacher_neg)
    return jnp.where(step >= config.gram.start_step, loss, 0.0)

  def losses(student_params, batch, targets, patch_targets, patches, drop_key, gram_patches, step):
    """The total loss and its terms (with iBOT, KoLeo or Gram anchoring, each of them)."""
    student_logits, patch_logits, global_cls, student_patches = forward.student_view_outputs(
        graphdef,
        student_params,
        batch['global_crops'],
        batch['local_crops'],
        drop_key,
        batch.get('masks'),
        patches,
        global_patches=gram)
    dino = objective.multicrop_cross_entropy(targets, student_logits, objective_config.student_temp)
    terms, total = {}, dino
    if gram:
      terms['gram_loss'] = gram_term(student_patches, gram_patches, step)
      total = total + gram_weight(step) * terms['gram_loss']
    if ibot:
      terms['ibot_loss'] = objective.masked_patch_cross_entropy(patch_targets, patch_logits,
                                                                patches.weights,
                                                                targets.shape[0] * targets.shape[1],
                                                                objective_config.student_temp)
      total = total + objective_config.ibot.loss_weight * terms['ibot_loss']
    if objective_config.koleo_weight:
      terms['koleo_loss'] = _koleo_term(global_cls, objective_config.koleo_group_size)
      total = total + objective_config.koleo_weight * terms['koleo_loss']
    return total, ({'dino_loss': dino, **terms} if terms else {})

  def train_step(state: TrainState, batch):
    step = state.step
    teacher_temp = schedules.teacher_temp(step)
    patches = forward.masked_patches(batch['masks'], group, group_bound) if ibot else None
    targets, flat_teacher_logits, patch_targets, patch_logits = teacher_side(
        state, batch, teacher_temp, patches)
    drop_key = jax.random.fold_in(state.rng, step)
    gram_patches = gram_targets(state, batch) if gram else None
    (loss, terms), grads = jax.value_and_grad(losses, has_aux=True)(state.student, batch, targets,
                                                                    patch_targets, patches,
                                                                    drop_key, gram_patches, step)
    # DINO cancels the prototypes' gradient in epoch 0 (PyTorch's AdamW then skips them: no
    # step count, moments or weight decay; kldino/core/optim.py); 'fixed' prototypes never learn.
    frozen = jnp.logical_or(fixed_prototypes, step < frozen_steps)
    grads = optim.zero_prototypes(grads, frozen)  # a frozen parameter has no gradient
    student, opt_state = optim.apply_gradients(optimizer, state.student, state.opt_state, grads,
                                               frozen)
    momentum = schedules.teacher_momentum(step)
    teacher = optax.incremental_update(student, state.teacher, 1.0 - momentum)
    norm_state = normalization.update(state.norm_state, flat_teacher_logits, teacher_temp)
    flat_targets = targets.reshape(flat_teacher_logits.shape)
    diagnostics = objective.target_diagnostics(flat_teacher_logits, flat_targets, teacher_temp)
    if ibot:
      norm_state = {
          **norm_state, 'patch':
              patch_normalization.update(state.norm_state['patch'], patch_logits, teacher_temp,
                                         patches.valid)
      }
      diagnostics.update({
          f'patch_{name}': value for name, value in objective.target_diagnostics(
              patch_logits, patch_targets, teacher_temp, patches.valid).items()
      })
    prior_entropy = objective.entropy(jnp.exp(norm_state['log_prior']))
    metrics = {
        'loss': loss,
        'kl': terms.get('dino_loss', loss) - diagnostics['target_entropy'],
        **terms,
        **diagnostics,
        'prior_effective_clusters': jnp.exp(prior_entropy),
        'grad_norm': optax.tree.norm(grads),
        'lr': schedules.learning_rate(step),
        'weight_decay': schedules.weight_decay(step),
        'teacher_momentum': momentum,
        'teacher_temp': teacher_temp,
        **({
            'gram_weight': gram_weight(step)
        } if gram else {}),
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
    if gram:  # after the EMA update, as DINOv3 (the kept teacher when the step was not finite)
      new_state = new_state.replace(
          gram_teacher=gram_lib.refreshed(config.gram, state.gram_teacher, teacher, step + 1))
    return new_state, metrics

  return train_step
