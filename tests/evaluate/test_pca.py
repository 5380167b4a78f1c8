"""The PCA of patch tokens against numpy's SVD of the centred patch matrix, and the foreground
threshold on patches whose foreground is known (two clusters)."""
import numpy as np
import pytest

from kldino.evaluate import pca

GRID = (6, 6)


def _svd_scores(rows, count):
  """Scores [M, count] of rows [M, D] on their first principal components, from the SVD."""
  centred = rows - rows.mean(axis=0)
  u, s, _ = np.linalg.svd(centred, full_matrices=False)
  return u[:, :count] * s[:count]


def _anisotropic(rng, rows, dim):
  """Rows whose principal variances are distinct (so that each axis is defined up to sign)."""
  return rng.standard_normal((rows, dim)) * np.linspace(3.0, 0.5, dim)


def _two_clusters(foreground_mask, rng, dim=16, noise=0.05):
  """Patch tokens [N, P, D]: one cluster on the patches of `foreground_mask` [N, P], another on
  the rest, with a little noise."""
  centres = rng.standard_normal((2, dim))
  tokens = np.where(foreground_mask[..., None], centres[0], centres[1])
  return tokens + noise * rng.standard_normal(tokens.shape)


def _centre_block(count, side):
  """[count, 36] masks of a side x side block in the middle of the 6 x 6 grid."""
  mask = np.zeros(GRID, bool)
  start = (GRID[0] - side) // 2
  mask[start:start + side, start:start + side] = True
  return np.broadcast_to(mask.reshape(-1), (count, mask.size))


def test_principal_axes_are_the_right_singular_vectors_up_to_sign():
  rows = _anisotropic(np.random.default_rng(0), 200, 8) + 5.0
  mean, axes = pca.principal_axes(rows, 3)
  _, _, vt = np.linalg.svd(rows - rows.mean(axis=0), full_matrices=False)
  np.testing.assert_allclose(mean, rows.mean(axis=0), atol=1e-12)
  np.testing.assert_allclose(np.abs(axes), np.abs(vt[:3]), atol=1e-8)
  np.testing.assert_allclose(np.abs(np.sum(axes * vt[:3], axis=1)), 1.0, atol=1e-8)
  # The sign is fixed: the largest-magnitude entry of each axis is positive.
  assert all(axis[np.argmax(np.abs(axis))] > 0 for axis in axes)


def test_axes_the_rows_do_not_span_are_zero():
  rows = np.array([[0.0, 0, 0, 0], [1, 0, 0, 0], [0, 2, 0, 0]])  # three points span a plane
  _, axes = pca.principal_axes(rows, 3)
  assert np.count_nonzero(np.abs(axes).sum(axis=1)) == 2 and not np.any(axes[2])
  _, same = pca.principal_axes(np.ones((5, 4)), 3)
  assert not np.any(same)


def test_first_channel_is_the_first_principal_component_up_to_sign():
  patches = _anisotropic(np.random.default_rng(1), 3 * 36, 10).reshape(3, 36, 10)
  result = pca.patch_pca(patches, GRID)
  assert result.shape == (3, 36, 4) and result.dtype == np.float32
  expected = _svd_scores(patches.reshape(-1, 10), 1)[:, 0]
  first = result[..., 0].reshape(-1)
  sign = np.sign(np.dot(first, expected))
  np.testing.assert_allclose(first, sign * expected, atol=1e-5)


@pytest.mark.parametrize('side', [2, 4])
def test_the_foreground_is_the_cluster_at_the_centre(side):
  """Two clusters, one a block in the middle of every image: that block is the foreground,
  whether it covers 4 or 16 of the 36 patches, and with the tokens negated."""
  mask = _centre_block(3, side)
  patches = _two_clusters(mask, np.random.default_rng(side))
  for tokens in (patches, -patches):
    result = pca.patch_pca(tokens, GRID)
    np.testing.assert_array_equal(result[..., 0] > pca.FOREGROUND_THRESHOLD, mask)


def test_an_object_filling_most_of_the_frame_is_still_the_foreground():
  """The background is the border ring only (20 of 36 patches), or less: the centre rule keeps the
  object, where 'the minority is the foreground' would pick the background."""
  mask = np.ones(GRID, bool)
  mask[0, :] = mask[:, 0] = False  # background on two sides: 11 patches of 36
  mask = np.broadcast_to(mask.reshape(-1), (2, 36))
  result = pca.patch_pca(_two_clusters(mask, np.random.default_rng(7)), GRID)
  np.testing.assert_array_equal(result[..., 0] > 0, mask)


def test_orientation_does_not_depend_on_the_sign_and_falls_back_to_the_minority():
  scores = np.random.default_rng(3).standard_normal((2, 36))
  np.testing.assert_array_equal(pca.orient_to_centre(scores, GRID),
                                pca.orient_to_centre(-scores, GRID))
  centred = pca.orient_to_centre(scores, GRID)
  weights = pca.centrality(GRID)
  assert np.sum(centred * (weights - weights.mean())) > 0
  # A 2 x 2 grid has no centre: one patch above zero, three below is already oriented.
  minority = np.array([[2.0, -1.0, -0.5, -0.5]])
  np.testing.assert_array_equal(pca.orient_to_centre(minority, (2, 2)), minority)
  np.testing.assert_array_equal(pca.orient_to_centre(-minority, (2, 2)), minority)


def test_rgb_is_a_pca_of_the_foreground_alone_scaled_over_it():
  rng = np.random.default_rng(4)
  mask = _centre_block(2, 4)
  # The foreground: a cluster with structure of its own, so that its three components are defined.
  patches = _two_clusters(mask, rng, noise=0.0)
  patches[mask] += 0.3 * _anisotropic(rng, int(mask.sum()), 16)
  result = pca.patch_pca(patches, GRID)
  foreground = result[..., 0] > 0
  np.testing.assert_array_equal(foreground, mask)
  assert not np.any(result[~foreground][:, 1:])  # background black
  rgb = result[foreground][:, 1:]
  scores = _svd_scores(patches[mask], 3)
  unit = (scores - scores.min(axis=0)) / np.ptp(scores, axis=0)
  for channel in range(3):  # a component of the other sign is scaled to 1 - x
    assert (np.allclose(rgb[:, channel], unit[:, channel], atol=1e-5) or
            np.allclose(rgb[:, channel], 1 - unit[:, channel], atol=1e-5)), channel
  np.testing.assert_allclose(rgb.min(axis=0), 0.0, atol=1e-7)
  np.testing.assert_allclose(rgb.max(axis=0), 1.0, atol=1e-6)


def test_a_small_or_flat_foreground_gives_black_not_nan():
  rows = np.zeros((6, 5))
  rows[:2] = [[1.0, 0, 0, 0, 0], [0, 1, 0, 0, 0]]
  foreground = np.array([True, True, False, False, False, False])
  rgb = pca.foreground_rgb(rows, foreground)  # two points: one component, two black channels
  assert np.isfinite(rgb).all() and not np.any(rgb[2:]) and not np.any(rgb[:, 1:])
  assert sorted(rgb[:2, 0]) == [0.0, 1.0]
  assert not np.any(pca.patch_pca(np.ones((1, 4, 3)), (2, 2)))  # identical tokens: all zero


def test_fewer_than_four_patches_are_refused():
  with pytest.raises(ValueError, match='at least 4, got 3'):
    pca.patch_pca(np.zeros((3, 1, 8)), (1, 1))
  assert pca.patch_pca(np.random.default_rng(5).standard_normal((4, 1, 8)),
                       (1, 1)).shape == (4, 1, 4)
