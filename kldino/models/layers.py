"""Small pieces shared by the backbones and the head."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

_SQRT_HALF = 1.0 / math.sqrt(2.0)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x) with the normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2, as DINO's
  nn.GELU.

  jax.nn.gelu(approximate=False) computes Phi through erfc (precise in the far negative tail),
  which XLA:CPU expands into a branchy rational approximation several times the cost of erf's;
  with erf (and drop path as a multiply) the tiny32 train step ran 5.89 -> 5.50 s
  (docs/performance.md). The two differ only for x < -5, where 1 + erf(x / sqrt 2) cancels, by
  < 1e-6 absolute (tests/models/test_layers.py).
  """
  return x * (0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF))


def drop_path(branch: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Stochastic depth: zero a residual branch for whole samples.

  Kept samples are scaled by 1/keep so that the branch's expectation is unchanged, and the
  deterministic network (key None) needs no rescaling.
  """
  if key is None or rate == 0.0:
    return branch
  keep = 1.0 - rate
  per_sample = (branch.shape[0],) + (1,) * (branch.ndim - 1)
  # A multiply by 0 or 1/keep, as DINO's drop_path: on XLA:CPU it fuses into the residual add,
  # where a select against a zeros array made a fusion of its own.
  scale = jax.random.bernoulli(key, keep, per_sample).astype(branch.dtype) / keep
  return branch * scale


def linear_drop_rates(max_rate: float, count: int) -> list[float]:
  """Rates rising linearly from 0 to max_rate over `count` residual blocks, as in DINO."""
  if count == 1:
    return [0.0]
  return [max_rate * index / (count - 1) for index in range(count)]


def block_key(drop_key: jax.Array | None, index: int) -> jax.Array | None:
  """A distinct key per residual block (None stays None: deterministic)."""
  return None if drop_key is None else jax.random.fold_in(drop_key, index)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps); the max keeps the gradient finite at x = 0."""
  squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def masked_standardise(x: jax.Array, mask: jax.Array | None = None, eps: float = 1e-5) -> jax.Array:
  """Standardise each feature over the batch axis, counting only rows where mask is True.

  Under jax.jit with the batch sharded over devices, these means are over the global batch.
  """
  weight = jnp.ones(x.shape[:1], x.dtype) if mask is None else mask.astype(x.dtype)
  weight = weight[:, None] / jnp.maximum(jnp.sum(weight), 1.0)
  mean = jnp.sum(weight * x, axis=0)
  variance = jnp.sum(weight * jnp.square(x - mean), axis=0)
  return (x - mean) * jax.lax.rsqrt(variance + eps)


def run_blocks(blocks, x, drop_key, *, remat: bool):
  """x through residual blocks in order, each with its own stochastic-depth key. With `remat`,
  each block's activations are recomputed in the backward pass instead of stored (memory for
  compute: large models at large batch)."""
  for index, block in enumerate(blocks):
    key = block_key(drop_key, index)
    x = _rematted_call(block, x, key) if remat else block(x, drop_key=key)
  return x


@nnx.remat
def _rematted_call(block, x, key):
  return block(x, drop_key=key)
