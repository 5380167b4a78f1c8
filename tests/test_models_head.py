"""The DINO head: masked batch norm, prototypes and logits against numpy, argument checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kldino.models import DINOHead, MaskedBatchNorm
from kldino.models.layers import l2_normalize


def head(**overrides):
  # The widths of test_models.py's models: each new shape costs a compile.
  args = dict(hidden_dim=32, bottleneck_dim=8, num_layers=3, num_prototypes=16, norm='batch',
              rngs=nnx.Rngs(0))
  args.update(overrides)
  return DINOHead(32, **args)


def randn(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_masked_batch_norm_matches_numpy_over_the_masked_rows():
  norm = MaskedBatchNorm(5)
  norm.scale[...] = jnp.asarray(randn((5,), 1))
  norm.bias[...] = jnp.asarray(randn((5,), 2))
  x = randn((9, 5), 3) * 4 + 3
  mask = np.array([1, 1, 0, 1, 1, 0, 1, 0, 1], bool)
  real = x[mask]
  expected = ((x - real.mean(0)) / np.sqrt(real.var(0) + 1e-5) * np.asarray(norm.scale[...])
              + np.asarray(norm.bias[...]))
  out = norm(jnp.asarray(x), jnp.asarray(mask))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(norm(jnp.asarray(x)), norm(jnp.asarray(x), jnp.ones(9, bool)))


def test_real_rows_do_not_see_the_padding_rows():
  model = head()
  features = randn((8, 32), 4)
  mask = np.arange(8) < 5
  padded = features.copy()
  padded[~mask] = 1e3 * randn((3, 32), 5)
  z = model.embed(jnp.asarray(features), jnp.asarray(mask))
  z_padded = model.embed(jnp.asarray(padded), jnp.asarray(mask))
  np.testing.assert_allclose(z_padded[:5], z[:5], rtol=1e-5, atol=1e-5)
  # Without the mask the padding does leak in: the test above can fail.
  assert not np.allclose(model.embed(jnp.asarray(padded))[:5], z[:5], atol=1e-3)


@pytest.mark.parametrize('norm, num_layers', [('none', 3), ('batch', 2), ('layer', 3),
                                              ('none', 1)])
def test_embed_shapes_and_no_normalisation(norm, num_layers):
  model = head(norm=norm, num_layers=num_layers)
  assert len(model.layers) == num_layers
  assert len(model.norms) == (0 if norm == 'none' else num_layers - 1)
  z = model.embed(jnp.asarray(randn((7, 32))))
  assert z.shape == (7, 8)
  assert not np.allclose(np.linalg.norm(z, axis=1), 1.0)


def test_mlp_init_is_lecun_normal():
  model = head(num_layers=4)
  kernels = np.stack([np.asarray(layer.kernel[...]) for layer in model.layers[:3]])  # 32 -> 32
  assert abs(kernels.std() * np.sqrt(32) - 1.0) < 0.05


def test_unit_prototypes_have_unit_columns():
  model = head(prototype_init_std=3.0)
  directions = np.asarray(model.prototypes[...])
  assert directions.shape == (8, 16)
  assert abs(directions.std() - 3.0) < 1.0
  unit = np.asarray(model.unit_prototypes())
  np.testing.assert_allclose(np.linalg.norm(unit, axis=0), 1.0, rtol=1e-6)
  np.testing.assert_allclose(unit, directions / np.linalg.norm(directions, axis=0), rtol=1e-5)


def test_centered_prototypes_are_unit_and_average_to_zero():
  learned, centered = head(), head(prototypes='centered')  # same seed: same directions
  directions = np.asarray(centered.prototypes[...], np.float64)
  np.testing.assert_array_equal(directions, learned.prototypes[...])
  expected = directions
  for _ in range(8):  # alternate the two projections, as the head does
    expected = expected - expected.mean(axis=1, keepdims=True)
    expected = expected / np.linalg.norm(expected, axis=0)
  unit = np.asarray(centered.unit_prototypes())
  np.testing.assert_allclose(unit, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(unit, axis=0), 1.0, rtol=1e-6)
  # One round leaves a visible mean (normalising moves it); eight leave almost none.
  one_round = directions - directions.mean(axis=1, keepdims=True)
  one_round = one_round / np.linalg.norm(one_round, axis=0)
  assert np.linalg.norm(unit.mean(axis=1)) < 1e-3 * np.linalg.norm(one_round.mean(axis=1))


def test_logits_are_cosines():
  model = head()
  z = randn((4, 8), 7) * 5
  directions = np.asarray(model.prototypes[...], np.float64)
  expected = ((z / np.linalg.norm(z, axis=1, keepdims=True))
              @ (directions / np.linalg.norm(directions, axis=0)))
  np.testing.assert_allclose(model.logits(jnp.asarray(z)), expected, rtol=1e-5, atol=1e-6)


def test_fixed_mode_is_recorded_and_uses_the_same_math():
  fixed, learned = head(prototypes='fixed'), head()
  assert fixed.prototype_mode == 'fixed'
  np.testing.assert_array_equal(fixed.unit_prototypes(), learned.unit_prototypes())


@pytest.mark.parametrize('overrides, message', [
    (dict(num_prototypes=1), 'num_prototypes=1 must be >= 2'),
    (dict(norm='group'), "unknown head norm 'group'"),
    (dict(prototypes='random'), "unknown prototypes mode 'random'"),
    (dict(num_layers=0), 'num_layers=0 must be >= 1'),
])
def test_bad_arguments(overrides, message):
  with pytest.raises(ValueError, match=message):
    head(**overrides)


def test_the_prototype_norm_is_not_fused_into_the_logits_matmul():
  """kldino/__init__.py turns XLA:CPU's reduction fusions off: a prototype column norm fused
  into the matmul was recomputed per tile (3.8 s of a 5.3 s ViT-S/16 sweep batch)."""
  import re  # pylint: disable=g-import-not-at-top
  prototypes = jnp.ones((32, 4096))
  z = jnp.ones((16, 32))
  text = jax.jit(lambda w, x: l2_normalize(x) @ l2_normalize(w, axis=0)).lower(
      prototypes, z).compile().as_text()
  computations = dict(re.findall(r'^%?([\w.\-]+) \(.*?\{\n(.*?)\n\}', text, re.S | re.M))
  matmul_fusions = re.findall(r'fusion\(.*calls=%?([\w.\-]+).*__ynn_fusion', text)
  fused = [computations[name] for name in matmul_fusions if name in computations]
  assert any(' dot(' in body for body in fused), 'no matmul fusion: the check would be empty'
  assert not any(' reduce(' in body for body in fused if ' dot(' in body)
