"""The student's optimizer: DINO's AdamW with scheduled lr / weight decay and gradient clipping."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

CLIP_MODES = ('per_param', 'global')


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


def decay_mask(params):
  """No weight decay on biases and other 1-D parameters (norm scales), as in DINO."""
  return jax.tree.map(lambda leaf: jnp.ndim(leaf) > 1, params)


def make_optimizer(optim_config, schedules) -> optax.GradientTransformation:
  if optim_config.clip_mode not in CLIP_MODES:
    raise ValueError(f"unknown optim.clip_mode '{optim_config.clip_mode}': choose one of "
                     f"{', '.join(CLIP_MODES)}")
  transforms = []
  if optim_config.clip_grad > 0:
    clip = (clip_by_param_norm if optim_config.clip_mode == 'per_param'
            else optax.clip_by_global_norm)
    transforms.append(clip(optim_config.clip_grad))
  transforms.append(optax.adamw(
      learning_rate=schedules.learning_rate, weight_decay=schedules.weight_decay,
      mask=decay_mask))
  return optax.chain(*transforms)
