"""The student's optimizer: DINO's AdamW with scheduled lr / weight decay and gradient clipping.

DINO freezes the head's last layer (the prototypes) during the first epochs by setting their
`.grad = None`, and PyTorch's AdamW skips such a parameter entirely: its step count and moments
do not advance and it gets no weight decay, so when it unfreezes its bias correction starts at
its own step 1. optax's AdamW has one step count for all parameters, so the Adam statistics are
split in two groups with a count each (`optax.partition`): 'prototypes' (every `head/prototype*`
parameter, see `is_prototype_path`) and 'rest'. The update takes `prototypes_frozen` (a traced
bool); while it is true the prototypes' gradient is cancelled before clipping (a parameter
without a gradient counts in no norm), their Adam state is kept as it was and their update is
zero. The lr and weight-decay schedules stay functions of the global step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

CLIP_MODES = ('per_param', 'per_module', 'global')
PROTOTYPES, REST = 'prototypes', 'rest'  # the Adam groups (labels of `optax.partition`)
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # optax's and PyTorch's AdamW defaults


def clip_by_param_norm(max_norm: float) -> optax.GradientTransformation:
  """Rescale *each parameter's* gradient to norm <= max_norm, as DINO's clip_gradients does.

  optax only offers the global-norm and block-RMS variants, hence this one.
  """

  def clip(updates, state, params=None):
    del params

    def clip_leaf(grad):
      norm = jnp.sqrt(jnp.sum(jnp.square(grad)))
      return grad * jnp.minimum(1.0, max_norm / (norm + 1e-6))

    return jax.tree.map(clip_leaf, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), clip)


def clip_by_module_norm(max_norm: float) -> optax.GradientTransformation:
  """Rescale the gradient of each module (the backbone, the head, the patch head: the tree's top
  level) to global norm <= max_norm, as DINOv2 clips each of its student's modules."""

  def clip(updates, state, params=None):
    del params
    clipped = {}
    for name, module in updates.items():
      norm = optax.tree.norm(module)
      clipped[name] = jax.tree.map(lambda grad: grad * jnp.minimum(1.0, max_norm / (norm + 1e-6)),
                                   module)
    return clipped, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), clip)


def decay_mask(params):
  """No weight decay on biases and other 1-D parameters (norm scales), as in DINO."""
  return jax.tree.map(lambda leaf: jnp.ndim(leaf) > 1, params)


def _key_name(entry):
  return getattr(entry, 'key', getattr(entry, 'name', None))


def is_prototype_path(path) -> bool:
  """Whether a parameter (a key path of the parameter tree) is one DINO freezes with the last
  layer: `head/prototypes`, `head/prototype_gain`, any `head/prototype*` (or below it), and the
  same of iBOT's separate `patch_head` (DINOv2 freezes both heads' last layers)."""
  names = [_key_name(entry) for entry in path]
  return (len(names) >= 2 and names[0] in ('head', 'patch_head') and isinstance(names[1], str) and
          names[1].startswith('prototype'))


# The backbone's parameters before its first block (DINOv2's layer 0 of the layer-wise decay).
_EMBEDDINGS = ('patch_embed', 'pos_embed', 'cls_token', 'register_tokens', 'mask_token')


def lr_multipliers(params, layerwise_decay: float, patch_embed_lr_mult: float):
  """DINOv2's per-parameter lr multiplier (dinov2/utils/param_groups.py): layerwise_decay **
  (depth + 1 - layer), where the layer is 0 for the ViT's embeddings and tokens, i + 1 for block
  i and depth + 1 for the rest (the final norm, the heads); times patch_embed_lr_mult for the
  patch embedding."""
  names = lambda path: [_key_name(entry) for entry in path]
  paths = [names(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  depth = 1 + max(
      (int(path[2]) for path in paths if path[:2] == ['backbone', 'blocks']), default=-1)

  def multiplier(path, _):
    path = names(path)
    layer = depth + 1
    if path[0] == 'backbone' and path[1] in _EMBEDDINGS:
      layer = 0
    elif path[:2] == ['backbone', 'blocks']:
      layer = int(path[2]) + 1
    scale = layerwise_decay**(depth + 1 - layer)
    return scale * (patch_embed_lr_mult if path[:2] == ['backbone', 'patch_embed'] else 1.0)

  return jax.tree_util.tree_map_with_path(multiplier, params)


def scale_by_lr_multipliers(layerwise_decay: float,
                            patch_embed_lr_mult: float) -> optax.GradientTransformation:
  """The updates (weight decay included, as DINOv2's parameter groups scale both) times each
  parameter's lr_multipliers."""

  def update(updates, state, params=None):
    del params
    factors = lr_multipliers(updates, layerwise_decay, patch_embed_lr_mult)
    return jax.tree.map(lambda u, f: u * f, updates, factors), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def freeze_labels(params):
  """The Adam group of each parameter: PROTOTYPES or REST."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: PROTOTYPES if is_prototype_path(path) else REST, params)


def zero_prototypes(tree, prototypes_frozen):
  """`tree` (gradients or updates) with its prototype leaves zeroed while `prototypes_frozen`."""

  def leaf(path, value):
    if not is_prototype_path(path):
      return value
    return jnp.where(prototypes_frozen, jnp.zeros_like(value), value)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def cancel_frozen_prototypes() -> optax.GradientTransformationExtraArgs:
  """Zero the prototypes' gradients / updates while the `prototypes_frozen` extra arg is true."""

  def update(updates, state, params=None, *, prototypes_frozen=False, **extra_args):
    del params, extra_args
    return zero_prototypes(updates, prototypes_frozen), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def hold_while_frozen(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`inner`, except that while `prototypes_frozen` its state does not advance and its update is
  zero: PyTorch's treatment of a parameter whose `.grad` is None."""

  def update(updates, state, params=None, *, prototypes_frozen=False, **extra_args):
    del extra_args
    new_updates, new_state = inner.update(updates, state, params)
    frozen = jnp.asarray(prototypes_frozen)
    new_updates = jax.tree.map(lambda u: jnp.where(frozen, jnp.zeros_like(u), u), new_updates)
    new_state = jax.tree.map(lambda new, old: jnp.where(frozen, old, new), new_state, state)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def make_optimizer(optim_config, schedules) -> optax.GradientTransformationExtraArgs:
  """AdamW as DINO runs it; `update(grads, state, params, prototypes_frozen=...)`.

  Without `prototypes_frozen` nothing is frozen. The state is a chain of: the cancelling step,
  the clipping (if any), `optax.PartitionState` with one `ScaleByAdamState` per group
  (PROTOTYPES, REST; each holds MaskedNode for the other group's leaves), the weight decay's
  and the lr's schedule counts (global steps), the final cancelling step.
  """
  if optim_config.clip_mode not in CLIP_MODES:
    raise ValueError(f"unknown optim.clip_mode '{optim_config.clip_mode}': choose one of "
                     f"{', '.join(CLIP_MODES)}")
  transforms = [cancel_frozen_prototypes()]
  if optim_config.clip_grad > 0:
    clip = {
        'per_param': clip_by_param_norm,
        'per_module': clip_by_module_norm,
        'global': optax.clip_by_global_norm
    }[optim_config.clip_mode]
    transforms.append(clip(optim_config.clip_grad))
  # optax.adamw's own chain, with the Adam statistics split by group.
  def adam():
    return optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS)

  transforms += [
      optax.partition({
          PROTOTYPES: hold_while_frozen(adam()),
          REST: adam()
      }, freeze_labels),
      optax.add_decayed_weights(schedules.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(schedules.learning_rate),
  ]
  if optim_config.layerwise_decay != 1.0 or optim_config.patch_embed_lr_mult != 1.0:
    transforms.append(
        scale_by_lr_multipliers(optim_config.layerwise_decay, optim_config.patch_embed_lr_mult))
  transforms.append(cancel_frozen_prototypes())  # no weight decay on a frozen parameter either
  return optax.chain(*transforms)


def apply_gradients(optimizer, params, opt_state, grads, prototypes_frozen):
  """One optimizer step, as the train step takes it: (new params, new optimizer state)."""
  updates, opt_state = optimizer.update(grads,
                                        opt_state,
                                        params,
                                        prototypes_frozen=prototypes_frozen)
  return optax.apply_updates(params, updates), opt_state


def adam_state(opt_state, group: str) -> optax.ScaleByAdamState:
  """The Adam state (count, mu, nu) of one group, PROTOTYPES or REST, of `make_optimizer`'s state;
  mu and nu hold optax.MaskedNode() at the other group's leaves."""
  for state in opt_state:
    if isinstance(state, optax.PartitionState):
      return state.inner_states[group].inner_state
  raise ValueError('not the state of kldino.core.optim.make_optimizer: no optax.PartitionState '
                   'in it')
