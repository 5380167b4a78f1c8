"""DINOv2's picture of dense features, pure numpy: PCA of patch tokens over all patches of a set
of images; the first component, thresholded, separates foreground from background; a second PCA
fitted on the foreground patches gives three components that, each scaled to [0, 1] over the
foreground, become RGB (background black). --mode=pca and TensorBoard use it.

The result of `patch_pca` is float32 [N, patches, 4] (patches row-major over the grid): the
first component, oriented so that the foreground is where it is > FOREGROUND_THRESHOLD, then the
three RGB values (0 on the background).
"""
from __future__ import annotations

import numpy as np

MIN_PATCHES = 4  # three components of the foreground need at least four points to span them
FOREGROUND_THRESHOLD = 0.0
RGB_COMPONENTS = 3
_RELATIVE_EPS = 1e-9  # of the largest variance: below it, a direction holds rounding error only


def principal_axes(rows: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], axes [count, D]) of rows [M, D]: the unit eigenvectors of the rows' covariance,
  largest variance first, each signed so that its largest-magnitude entry is positive (a
  deterministic choice, as scikit-learn's svd_flip); axes the rows do not span are zero."""
  rows = np.asarray(rows, np.float64)
  axes = np.zeros((count, rows.shape[1]))
  if len(rows) == 0:
    return np.zeros(rows.shape[1]), axes
  mean = rows.mean(axis=0)
  centred = rows - mean
  # The D x D covariance is cheaper than an SVD of the M x D rows when there are many patches.
  variances, vectors = np.linalg.eigh(centred.T @ centred)
  spanned = min(count, len(rows) - 1, rows.shape[1])
  top = vectors[:, ::-1][:, :spanned].T
  top = top * np.sign(top[np.arange(spanned), np.argmax(np.abs(top), axis=1)])[:, None]
  # Directions of rounding-error variance are no axes: their scores would be noise scaled up.
  spread = variances[::-1][:spanned, None] > _RELATIVE_EPS * max(variances.max(), 0.0)
  axes[:spanned] = np.where(spread, top, 0.0)
  return mean, axes


def centrality(patch_grid: tuple[int, int]) -> np.ndarray:
  """[h * w], row-major: minus each patch's distance to the grid's centre (larger inside)."""
  rows, columns = np.meshgrid(np.arange(patch_grid[0]), np.arange(patch_grid[1]), indexing='ij')
  return -np.hypot(rows - (patch_grid[0] - 1) / 2, columns - (patch_grid[1] - 1) / 2).reshape(-1)


def orient_to_centre(first: np.ndarray, patch_grid: tuple[int, int]) -> np.ndarray:
  """The first component's scores [N, h * w], negated if need be so that they are larger towards
  the grid's centre: an object is framed near the centre and the background reaches the border,
  which holds whether the object is small or fills most of the picture (the rule 'foreground is
  the minority' fails on the latter). A grid with no centre (2 x 2, 1 x 1): the minority of the
  patches is taken to be the foreground."""
  weights = centrality(patch_grid)
  lean = np.sum(first * (weights - weights.mean()))
  if lean == 0:
    lean = np.sum(first < FOREGROUND_THRESHOLD) - np.sum(first > FOREGROUND_THRESHOLD)
  return -first if lean < 0 else first


def unit_range(values: np.ndarray) -> np.ndarray:
  """values [M, C] scaled per column from its minimum to its maximum onto [0, 1] (0 if flat)."""
  if len(values) == 0:
    return values
  low, span = values.min(axis=0), np.ptp(values, axis=0)
  return np.where(span > 0, (values - low) / np.where(span > 0, span, 1.0), 0.0)


def foreground_rgb(rows: np.ndarray, foreground: np.ndarray) -> np.ndarray:
  """[M, 3]: the foreground rows' first three components by a PCA fitted on them alone, each
  scaled to [0, 1] over the foreground; 0 (black) on the background."""
  kept = np.asarray(rows, np.float64)[foreground]
  mean, axes = principal_axes(kept, RGB_COMPONENTS)
  rgb = np.zeros((len(rows), RGB_COMPONENTS))
  rgb[foreground] = unit_range((kept - mean) @ axes.T)
  return rgb


def patch_pca(patches: np.ndarray, patch_grid: tuple[int, int]) -> np.ndarray:
  """float32 [N, h * w, 4] of patch tokens [N, h * w, D]: the oriented first component, then the
  foreground's RGB (module docstring). ValueError with fewer than MIN_PATCHES patches in all."""
  count, per_image, dim = patches.shape
  if count * per_image < MIN_PATCHES:
    raise ValueError(f'a PCA of patches needs at least {MIN_PATCHES}, got {count * per_image}')
  rows = np.asarray(patches, np.float64).reshape(-1, dim)
  mean, axes = principal_axes(rows, 1)
  first = orient_to_centre(((rows - mean) @ axes[0]).reshape(count, per_image), patch_grid)
  foreground = first.reshape(-1) > FOREGROUND_THRESHOLD
  rgb = foreground_rgb(rows, foreground).reshape(count, per_image, RGB_COMPONENTS)
  return np.concatenate([first[..., None], rgb], axis=-1).astype(np.float32)
