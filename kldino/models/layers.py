"""Small pieces shared by the backbones and the head."""
from __future__ import annotations

import math

import numpy as np
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


def run_blocks(blocks, x, drop_key, *, remat: bool, positions=None):
  """x through residual blocks in order, each with its own stochastic-depth key (and, when given,
  a ViT's RoPE `positions`). With `remat`, each block's activations are recomputed in the
  backward pass instead of stored (memory for compute: large models at large batch)."""
  for index, block in enumerate(blocks):
    key = block_key(drop_key, index)
    x = (_rematted_call if remat else _call)(block, x, key, positions)
  return x


def _call(block, x, key, positions):
  if positions is None:
    return block(x, drop_key=key)
  return block(x, drop_key=key, positions=positions)


_rematted_call = nnx.remat(_call)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a (PyTorch: -0.75, or -0.5 antialiased)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((x - 5) * x + 8) * x * a - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
  """The bilinear kernel."""
  return np.maximum(0.0, 1.0 - np.abs(x))


# method -> (the kernel without antialias, the kernel with it, its half-width in input pixels).
_TORCH_KERNELS = {
    'bicubic': (lambda x: _cubic(x, -0.75), lambda x: _cubic(x, -0.5), 2.0),
    'bilinear': (_triangle, _triangle, 1.0),
}
RESIZE_METHODS = tuple(_TORCH_KERNELS)


def torch_resize_matrix(in_size: int,
                        out_size: int,
                        scale: float | None = None,
                        antialias: bool = False,
                        method: str = 'bicubic') -> np.ndarray:
  """[out_size, in_size] float32 weights of torch.nn.functional.interpolate(mode=`method`,
  align_corners=False) along one axis: `scale` is its scale_factor (None: out_size / in_size),
  which sets where the samples fall. Without antialias, the kernel (bicubic: Keys a = -0.75) on
  the nearest pixels, indices clamped at the border (bilinear: a negative sample position is
  clamped to 0, as torch does); with it (and when shrinking, the kernel widened by the shrink
  factor; bicubic a = -0.5) over the pixels the kernel covers, renormalised, as PIL resizes."""
  plain_kernel, antialias_kernel, half_width = _TORCH_KERNELS[method]
  source_step = 1.0 / scale if scale else in_size / out_size
  weights = np.zeros((out_size, in_size), np.float64)
  for out_index in range(out_size):
    if antialias:
      support = half_width * max(source_step, 1.0)
      center = source_step * (out_index + 0.5)
      low = max(int(center - support + 0.5), 0)
      high = min(int(center + support + 0.5), in_size)
      taps = np.arange(low, high)
      tap_weights = antialias_kernel((taps - center + 0.5) / max(source_step, 1.0))
      weights[out_index, taps] = tap_weights / tap_weights.sum()
      continue
    source = (out_index + 0.5) * source_step - 0.5
    if method == 'bilinear':
      source = max(source, 0.0)
    floor = math.floor(source)
    for offset in range(1 - int(half_width), 1 + int(half_width)):
      tap = min(max(floor + offset, 0), in_size - 1)
      weights[out_index, tap] += plain_kernel(np.asarray(source - floor - offset))
  return weights.astype(np.float32)


def resize_patch_grid(tokens: jax.Array,
                      out_side: int,
                      *,
                      method: str = 'bicubic',
                      antialias: bool = False) -> jax.Array:
  """Patch tokens [N, h * h, D] of a square grid (row-major) resized to [N, out_side^2, D] as
  torch's interpolate(size=(out_side, out_side), mode=`method`, align_corners=False) resizes
  [N, D, h, h] (DINOv3's Gram teacher features, dinov3/train/ssl_meta_arch.py)."""
  side = math.isqrt(tokens.shape[1])
  if side == out_side:
    return tokens
  matrix = jnp.asarray(torch_resize_matrix(side, out_side, antialias=antialias, method=method))
  grid = tokens.reshape(tokens.shape[0], side, side, tokens.shape[-1])
  resized = jnp.einsum('oh,nhwd,pw->nopd',
                       matrix,
                       grid,
                       matrix,
                       precision=jax.lax.Precision.HIGHEST)
  return resized.reshape(tokens.shape[0], out_side * out_side, tokens.shape[-1])
