"""kldino/models/rope.py against tests/torch_dinov3.py's transcription of DINOv3's RoPE: the
periods buffer bit for bit, the sin / cos tables for square and rectangular grids under each
coordinate normalisation, the rotation of the patch tokens only; and the training-time
coordinate augmentations' ranges."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kldino.models import rope
from tests import torch_dinov3

DIM, HEADS = 64, 2  # head_dim 32: 8 periods


@pytest.mark.parametrize('head_dim', [16, 64, 96])
def test_periods_are_dinov3s_buffer_bit_for_bit(head_dim):
  reference = torch_dinov3.RopePositionEmbedding(head_dim * 2, 2, base=100.0)
  np.testing.assert_array_equal(rope.rope_periods(100.0, head_dim), reference.periods.numpy())


@pytest.mark.parametrize('normalize', rope.NORMALIZE_COORDS)
@pytest.mark.parametrize('grid', [(4, 4), (3, 5), (7, 2)])
def test_sin_cos_equal_dinov3s(normalize, grid):
  reference = torch_dinov3.RopePositionEmbedding(DIM, HEADS, base=100.0, normalize_coords=normalize)
  expected_sin, expected_cos = reference(*grid)
  coords = rope.patch_coords(*grid, normalize)
  sin, cos = rope.sin_cos(coords, rope.rope_periods(100.0, DIM // HEADS))
  np.testing.assert_allclose(sin, expected_sin.numpy(), atol=1e-6)
  np.testing.assert_allclose(cos, expected_cos.numpy(), atol=1e-6)
  assert normalize == 'min' or float(jnp.max(jnp.abs(coords))) < 1.0


def test_rotate_turns_the_trailing_patch_tokens_as_rope_apply():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3 + 12, HEADS, DIM // HEADS)).astype(np.float32)  # 3 prefix tokens
  sin, cos = rope.sin_cos(rope.patch_coords(3, 4, 'separate'), rope.rope_periods(100.0, 32))
  got = np.asarray(rope.rotate(jnp.asarray(x), sin, cos))
  patches = torch.from_numpy(x[:, 3:]).transpose(1, 2)  # [B, heads, n, head_dim]
  expected = torch_dinov3.rope_apply(patches, torch.tensor(np.asarray(sin)),
                                     torch.tensor(np.asarray(cos))).transpose(1, 2)
  np.testing.assert_array_equal(got[:, :3], x[:, :3])
  np.testing.assert_allclose(got[:, 3:], expected.numpy(), atol=1e-6)


def test_augmentations_stay_in_their_ranges_and_are_off_at_zero():
  coords = rope.patch_coords(4, 6, 'separate')
  key = jax.random.key(0)
  assert np.array_equal(rope.augment_coords(coords, key, rope.RopeOptions()), coords)
  rescaled = [
      rope.augment_coords(coords, jax.random.key(seed), rope.RopeOptions(rescale_coords=2.0))
      for seed in range(20)
  ]
  factors = np.array([float(r[0, 0] / coords[0, 0]) for r in rescaled])
  assert np.all((factors >= 0.5) & (factors <= 2.0)) and np.ptp(factors) > 0.1
  for r in rescaled:  # one factor for both axes
    np.testing.assert_allclose(r, coords * (r[0, 0] / coords[0, 0]), rtol=1e-5)
  shifted = rope.augment_coords(coords, key, rope.RopeOptions(shift_coords=0.3)) - coords
  assert np.all(np.abs(shifted) <= 0.3) and np.allclose(shifted, shifted[:1])
  jittered = rope.augment_coords(coords, key, rope.RopeOptions(jitter_coords=1.5)) / coords
  assert np.all((jittered >= 1 / 1.5 - 1e-6) & (jittered <= 1.5 + 1e-6))


def test_an_unknown_normalisation_names_the_key_and_the_choices():
  with pytest.raises(ValueError,
                     match="unknown model.rope_normalize_coords 'mean': choose one of min, max, "
                     'separate'):
    rope.patch_coords(2, 2, 'mean')
