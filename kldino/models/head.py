"""The DINO head: projection MLP -> z, and K unit-norm prototypes giving logits w_k . z/|z|."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kldino.models.layers import gelu, l2_normalize, masked_standardise

HEAD_NORMS = ('none', 'batch', 'layer')
# Variance 1/fan_in (untruncated): keeps the logits' spread at init comparable with tau_t.
_lecun_normal = nnx.initializers.variance_scaling(1.0, 'fan_in', 'normal')
PROTOTYPE_MODES = ('learned', 'fixed', 'centered')
_CENTERING_ROUNDS = 8  # center-and-normalise rounds for 'centered' prototypes


class MaskedBatchNorm(nnx.Module):
  """Standardise each feature over the batch axis, counting only the rows where mask is True.

  No running statistics: the head normalises with the current batch in training and in the
  sweep alike. Under jax.jit with the batch sharded over devices, the mean over axis 0 is the
  global mean, so the statistics never depend on how the batch is split.
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-5):
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.epsilon = epsilon

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    standardised = masked_standardise(x, mask, self.epsilon)
    return standardised * self.scale[...] + self.bias[...]


def _check_head_args(num_prototypes: int, norm: str, prototypes: str, num_layers: int):
  if num_prototypes < 2:
    raise ValueError(f'num_prototypes={num_prototypes} must be >= 2 (model.num_prototypes)')
  if norm not in HEAD_NORMS:
    raise ValueError(f"unknown head norm '{norm}': choose one of {', '.join(HEAD_NORMS)}")
  if prototypes not in PROTOTYPE_MODES:
    raise ValueError(f"unknown prototypes mode '{prototypes}': choose one of "
                     f"{', '.join(PROTOTYPE_MODES)}")
  if num_layers < 1:
    raise ValueError(f'num_layers={num_layers} must be >= 1 (model.head_num_layers)')


def _hidden_norm(norm: str, width: int, rngs: nnx.Rngs) -> nnx.Module:
  if norm == 'batch':
    return MaskedBatchNorm(width)
  return nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs)


class DINOHead(nnx.Module):
  """MLP in -> hidden -> ... -> bottleneck, then cosine logits against K prototypes.

  The prototypes are weight-normalised with the gain fixed at 1: `prototypes` [bottleneck, K]
  is the direction parameter, and only its unit columns (`unit_prototypes()`) are used.
  LeCun-normal init (not DINO's trunc-normal .02): on small data the tiny init spread of the
  logits made centered targets uniform and the head collapsed (NOTES.md, the prototype).
  """

  def __init__(self, in_dim: int, *, hidden_dim: int, bottleneck_dim: int, num_layers: int,
               num_prototypes: int, norm: str = 'none', prototypes: str = 'learned',
               prototype_init_std: float = 1.0, rngs: nnx.Rngs):
    _check_head_args(num_prototypes, norm, prototypes, num_layers)
    widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
    self.layers = nnx.List([
        nnx.Linear(fan_in, fan_out, kernel_init=_lecun_normal, rngs=rngs)
        for fan_in, fan_out in zip(widths[:-1], widths[1:])])
    num_norms = 0 if norm == 'none' else num_layers - 1
    self.norms = nnx.List([_hidden_norm(norm, hidden_dim, rngs) for _ in range(num_norms)])
    self.norm = norm
    self.prototypes = nnx.Param(
        prototype_init_std * jax.random.normal(rngs.params(), (bottleneck_dim, num_prototypes)))
    # 'fixed' is the same math as 'learned'; the train step masks the prototypes' update.
    self.prototype_mode = prototypes

  def embed(self, features: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """z [B, bottleneck], not normalised; `mask` [B] excludes padding rows from batch stats."""
    x = features
    for index, layer in enumerate(self.layers[:-1]):
      x = layer(x)
      if self.norm == 'batch':
        x = self.norms[index](x, mask)
      elif self.norm == 'layer':
        x = self.norms[index](x)
      x = gelu(x)
    return self.layers[-1](x)

  def unit_prototypes(self) -> jax.Array:
    """The prototypes as unit columns [bottleneck, K]; 'centered' ones also average to zero."""
    directions = self.prototypes[...]
    if self.prototype_mode != 'centered':
      return l2_normalize(directions, axis=0)
    # The paper's w_bar = 0 for *unit* prototypes (centering is then the Jensen bound of the
    # prior): normalising moves the mean again, so alternate the two projections; each round
    # shrinks ||w_bar|| about 4x (measured), so 8 rounds leave ~1e-4 of it.
    for _ in range(_CENTERING_ROUNDS):
      directions = l2_normalize(directions - jnp.mean(directions, axis=1, keepdims=True), axis=0)
    return directions

  def logits(self, z: jax.Array) -> jax.Array:
    """Cosines [B, K] between z and each prototype."""
    return l2_normalize(z) @ self.unit_prototypes()
