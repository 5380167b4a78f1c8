"""DINOv3's rotary position embedding (dinov3/layers/rope_position_encoding.py, applied in
dinov3/layers/attention.py): axial RoPE without learned weights.

Each patch has coordinates in [-1, 1] per axis (patch centres over the grid, normalised as
`normalize_coords` says; 'min' goes beyond on the longer axis). Per head, feature pairs
(j, j + head_dim / 2) rotate by 2 pi * coordinate / period: the first head_dim / 4 pairs by the
row, the others by the column, over the periods base^(4i / head_dim), i < head_dim / 4. Only the
patch tokens' queries and keys rotate; CLS and register tokens pass unchanged. In training,
DINOv3 may shift, jitter (per axis) or rescale (both axes) the coordinates with fresh draws in
every block.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZE_COORDS = ('min', 'max', 'separate')


@dataclasses.dataclass(frozen=True)
class RopeOptions:
  """DINOv3's RopePositionEmbedding arguments (model.rope_*); 0 turns an augmentation off."""
  base: float = 100.0
  normalize_coords: str = 'separate'
  shift_coords: float = 0.0
  jitter_coords: float = 0.0
  rescale_coords: float = 0.0


def rope_periods(base: float, head_dim: int) -> np.ndarray:
  """[head_dim / 4] float32: base ** (2i / (head_dim / 2)), RopePositionEmbedding's `periods`
  buffer bit for bit (float32 exponents; the power rounded once from float64, as torch's)."""
  exponents = 2 * np.arange(head_dim // 4, dtype=np.float32) / np.float32(head_dim // 2)
  return np.power(float(base), exponents.astype(np.float64)).astype(np.float32)


def patch_coords(grid_height: int, grid_width: int, normalize_coords: str) -> jax.Array:
  """[h * w, 2] float32 (row, column) of the patch centres, row-major, 2 * (i + 0.5) / n - 1:
  'separate' divides each axis by its own size n, 'max' / 'min' both by the larger / smaller one
  (in [-1, 1] but for 'min' on the longer axis)."""
  if normalize_coords not in NORMALIZE_COORDS:
    raise ValueError(f"unknown model.rope_normalize_coords '{normalize_coords}': choose one of "
                     f"{', '.join(NORMALIZE_COORDS)}")
  divisors = {
      'separate': (grid_height, grid_width),
      'max': (max(grid_height, grid_width),) * 2,
      'min': (min(grid_height, grid_width),) * 2,
  }[normalize_coords]
  rows = (np.arange(grid_height, dtype=np.float32) + 0.5) / np.float32(divisors[0])
  columns = (np.arange(grid_width, dtype=np.float32) + 0.5) / np.float32(divisors[1])
  grid = np.stack(np.meshgrid(rows, columns, indexing='ij'), axis=-1).reshape(-1, 2)
  return jnp.asarray(2.0 * grid - 1.0)


def _log_uniform(key: jax.Array, shape: tuple, bound: float) -> jax.Array:
  """exp(uniform(-log bound, log bound)): a factor in [1 / bound, bound]."""
  return jnp.exp(jax.random.uniform(key, shape, minval=-math.log(bound), maxval=math.log(bound)))


def augment_coords(coords: jax.Array, key: jax.Array, options: RopeOptions) -> jax.Array:
  """DINOv3's training-time coordinate augmentations, in its order: a shift uniform in
  [-shift, shift] per axis, a log-uniform jitter per axis, one log-uniform rescale."""
  shift_key, jitter_key, rescale_key = jax.random.split(key, 3)
  if options.shift_coords:
    coords = coords + jax.random.uniform(
        shift_key, (2,), minval=-options.shift_coords, maxval=options.shift_coords)
  if options.jitter_coords:
    coords = coords * _log_uniform(jitter_key, (2,), options.jitter_coords)
  if options.rescale_coords:
    coords = coords * _log_uniform(rescale_key, (1,), options.rescale_coords)
  return coords


def sin_cos(coords: jax.Array, periods: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """(sin, cos) [n, head_dim] float32 of coords [n, 2]: the angles of the row for every period,
  then of the column, that whole tiled twice (RopePositionEmbedding.forward)."""
  angles = 2 * math.pi * coords[:, :, None] / jnp.asarray(periods)[None, None, :]
  angles = jnp.tile(angles.reshape(coords.shape[0], -1), (1, 2))
  return jnp.sin(angles), jnp.cos(angles)


def rotate(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """RoPE on the last sin.shape[0] tokens of x [B, N, heads, head_dim], in float32 and back to
  x's dtype, the leading (CLS, register) tokens unchanged (SelfAttention.apply_rope)."""
  prefix = x.shape[1] - sin.shape[0]
  rotated = x[:, prefix:].astype(jnp.float32)
  first, second = jnp.split(rotated, 2, axis=-1)
  turned = jnp.concatenate([-second, first], axis=-1)  # rope_rotate_half
  rotated = rotated * cos[:, None] + turned * sin[:, None]
  return jnp.concatenate([x[:, :prefix], rotated.astype(x.dtype)], axis=1)
