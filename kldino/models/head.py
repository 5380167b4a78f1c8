"""The DINO head: projection MLP -> z, and K prototypes giving logits g_k w_k . z/|z|, |w_k| = 1."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kldino.models.layers import gelu, l2_normalize, masked_standardise

HEAD_NORMS = ('none', 'batch', 'layer')
HEAD_INITS = ('dino', 'lecun')
PROTOTYPE_MODES = ('learned', 'fixed', 'centered')
_CENTERING_ROUNDS = 8  # center-and-normalise rounds for 'centered' prototypes

# The MLP's kernels. 'dino': DINO's trunc_normal_(std=.02) with its default bounds +-2, which are
# absolute (+-100 std), so it never truncates and a plain normal is the same distribution (as in
# vit.py). 'lecun': variance 1/fan_in, which keeps the logits' spread at init comparable with
# tau_t (on the digits, DINO's tiny init spread made the centered targets uniform and the head
# collapsed: docs/results.md, the convnet rows). Biases start at 0 in both.
_KERNEL_INITS = {
    'dino': nnx.initializers.normal(0.02),
    'lecun': nnx.initializers.variance_scaling(1.0, 'fan_in', 'normal'),
}


class MaskedBatchNorm(nnx.Module):
  """Standardise each feature over the batch axis, counting only the rows where mask is True.

  No running statistics: the head normalises with the current batch in training and in the
  prior pass alike. Under jax.jit with the batch sharded over devices, the mean over axis 0 is the
  global mean, so the statistics never depend on how the batch is split.
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-5):
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.epsilon = epsilon

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    standardised = masked_standardise(x, mask, self.epsilon)
    return standardised * self.scale[...] + self.bias[...]


def _check_head_args(num_prototypes: int, norm: str, prototypes: str, num_layers: int, init: str,
                     prototype_init_std: float, norm_last_layer: bool):
  if num_prototypes < 2:
    raise ValueError(f'num_prototypes={num_prototypes} must be >= 2 (model.num_prototypes)')
  if norm not in HEAD_NORMS:
    raise ValueError(f"unknown head norm '{norm}': choose one of {', '.join(HEAD_NORMS)}")
  if prototypes not in PROTOTYPE_MODES:
    raise ValueError(f"unknown prototypes mode '{prototypes}': choose one of "
                     f"{', '.join(PROTOTYPE_MODES)}")
  if num_layers < 1:
    raise ValueError(f'num_layers={num_layers} must be >= 1 (model.head_num_layers)')
  if init not in HEAD_INITS:
    raise ValueError(f"unknown head init '{init}' (model.head_init): choose one of "
                     f"{', '.join(HEAD_INITS)}")
  if not (math.isfinite(prototype_init_std) and prototype_init_std >= 0):
    raise ValueError(f'model.prototype_init_std={prototype_init_std} must be 0 (DINO\'s '
                     'uniform +-1/sqrt(bottleneck)) or the std (> 0) of a normal init')
  if not norm_last_layer and prototypes != 'learned':
    raise ValueError(f"model.norm_last_layer=False (a learned gain per prototype) needs "
                     f"model.prototypes='learned', not '{prototypes}': 'fixed' prototypes must "
                     "not change and 'centered' ones must stay unit vectors")


def _hidden_norm(norm: str, width: int, rngs: nnx.Rngs) -> nnx.Module:
  if norm == 'batch':
    return MaskedBatchNorm(width)
  return nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs)


def init_prototypes(key: jax.Array,
                    bottleneck_dim: int,
                    num_prototypes: int,
                    std: float = 0.0) -> jax.Array:
  """Raw prototype directions [bottleneck, K].

  std 0: DINO's. Its last layer is weight_norm(nn.Linear(bottleneck, K, bias=False)) made after
  the head's trunc-normal init is applied, so the direction weight_v keeps nn.Linear's default,
  uniform(+-1/sqrt(bottleneck)) (variance 1/(3 bottleneck)). Only the unit columns enter the
  logits, but the raw norm sets the angular step of each update (the gradient of v/|v| is
  1/|v|), so the scale matters. std > 0: a normal with that std (the digits configs: 1.0).
  """
  shape = (bottleneck_dim, num_prototypes)
  if std > 0:
    return std * jax.random.normal(key, shape)
  bound = 1.0 / math.sqrt(bottleneck_dim)
  return jax.random.uniform(key, shape, minval=-bound, maxval=bound)


class DINOHead(nnx.Module):
  """MLP in -> hidden -> ... -> bottleneck (exact GELU between), then cosine logits against K
  prototypes, as DINO's DINOHead with use_bn=False (or batch / layer norms inside the MLP).

  The prototypes are DINO's weight-normalised last layer: `prototypes` [bottleneck, K] is the
  direction parameter v, and only its unit columns (`unit_prototypes()`) are used. With
  `norm_last_layer` (DINO's default) the gain is fixed at 1; without it, `prototype_gain`
  [1, K] is DINO's learnable weight_g (init 1) and logits are g_k cos(z, w_k). It is 2-D like
  DINO's weight_g [K, 1], so weight decay applies to it as it does in DINO (only 1-D parameters
  and biases are exempt there and in optim.decay_mask).

  `init` 'dino' (the default) is DINO's: MLP kernels normal(0, .02), zero biases; with
  `prototype_init_std` 0 the prototypes are DINO's too (init_prototypes).
  """

  def __init__(self,
               in_dim: int,
               *,
               hidden_dim: int,
               bottleneck_dim: int,
               num_layers: int,
               num_prototypes: int,
               norm: str = 'none',
               prototypes: str = 'learned',
               init: str = 'dino',
               prototype_init_std: float = 0.0,
               norm_last_layer: bool = True,
               rngs: nnx.Rngs):
    _check_head_args(num_prototypes, norm, prototypes, num_layers, init, prototype_init_std,
                     norm_last_layer)
    widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
    self.layers = nnx.List([
        nnx.Linear(fan_in,
                   fan_out,
                   kernel_init=_KERNEL_INITS[init],
                   bias_init=nnx.initializers.zeros_init(),
                   rngs=rngs) for fan_in, fan_out in zip(widths[:-1], widths[1:])
    ])
    num_norms = 0 if norm == 'none' else num_layers - 1
    self.norms = nnx.List([_hidden_norm(norm, hidden_dim, rngs) for _ in range(num_norms)])
    self.norm = norm
    self.prototypes = nnx.Param(
        init_prototypes(rngs.params(), bottleneck_dim, num_prototypes, prototype_init_std))
    # 'fixed' is the same math as 'learned'; the train step masks the prototypes' update.
    self.prototype_mode = prototypes
    self.norm_last_layer = norm_last_layer
    if not norm_last_layer:
      self.prototype_gain = nnx.Param(jnp.ones((1, num_prototypes), jnp.float32))

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
    """Cosines [B, K] between z and each prototype, times the gain without norm_last_layer."""
    cosines = l2_normalize(z) @ self.unit_prototypes()
    if self.norm_last_layer:
      return cosines
    return cosines * self.prototype_gain[...]
