"""kldino/models/layers.py: exact GELU, stochastic depth over whole samples, standardisation over
the batch's real rows, and rematerialised blocks that compute the same."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kldino.models.layers import drop_path, gelu, masked_standardise

RNG = np.random.default_rng(0)


def test_gelu_is_exact_gelu_with_its_derivative():
  """x * Phi(x) and its derivative Phi(x) + x * phi(x), from math.erf in float64."""
  x = np.concatenate([np.linspace(-12.0, 12.0, 4801), [-5.3, -0.7071, 0.0, 0.3, 2.9]])
  phi_cdf = np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
  phi_pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
  values, pullback = jax.vjp(gelu, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(values, x * phi_cdf, rtol=2e-6, atol=1e-6)
  np.testing.assert_allclose(pullback(jnp.ones(len(x), jnp.float32))[0],
                             phi_cdf + x * phi_pdf,
                             rtol=1e-5,
                             atol=2e-6)
  # DINO's nn.GELU is the exact form, not the tanh one, which differs by up to ~5e-4 here.
  assert np.max(np.abs(np.asarray(values) - np.asarray(jax.nn.gelu(x, approximate=True)))) > 1e-4


def test_drop_path_drops_whole_samples_and_preserves_the_mean():
  branch = jnp.ones((20000, 3, 2))
  out = np.asarray(drop_path(branch, 0.3, jax.random.key(0)))
  per_sample = out.reshape(len(out), -1)
  assert np.all(per_sample == per_sample[:, :1])  # one draw per sample
  assert set(np.unique(out)) <= {0.0, np.float32(1 / 0.7)}
  kept = np.mean(per_sample[:, 0] > 0)
  assert abs(kept - 0.7) < 4 * math.sqrt(0.7 * 0.3 / len(out))
  assert abs(out.mean() - 1.0) < 0.03
  np.testing.assert_array_equal(drop_path(branch, 0.3, None), branch)


@pytest.mark.parametrize('name', ['vit_nano', 'convnet_small'])
def test_remat_gives_the_same_features_and_gradients(name):
  from kldino.models import forward
  from kldino.core import step as step_lib  # pylint: disable=g-import-not-at-top
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(name=name)
  plain, params = step_lib.build_graphdef(config, 1)
  rematted, _ = step_lib.build_graphdef(tiny_config(name=name, remat=True), 1)
  params = jax.tree.map(
      lambda leaf: jax.random.normal(jax.random.PRNGKey(leaf.size), leaf.shape) * 0.1, params)
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 1))

  def loss(graphdef, p):
    return jnp.sum(forward.backbone_features(graphdef, p, images)**2)

  np.testing.assert_allclose(loss(rematted, params), loss(plain, params), rtol=1e-6)
  grads = [jax.grad(lambda p, g=g: loss(g, p))(params) for g in (plain, rematted)]
  for a, b in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_masked_standardise_over_batch():
  z = RNG.standard_normal((10, 4)).astype(np.float32) * 3 + 1
  mask = np.array([True] * 7 + [False] * 3)
  real = z[mask]
  expected = (real - real.mean(0)) / np.sqrt(real.var(0) + 1e-5)
  got = masked_standardise(jnp.asarray(z), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got)[mask], expected, rtol=1e-4, atol=1e-5)
