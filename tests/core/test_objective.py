"""Every normalisation against an independent numpy implementation of its formula."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kldino.core import objective

RNG = np.random.default_rng(0)


def np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def objective_config(**overrides):
  cfg = ml_collections.ConfigDict(
      dict(normalization='prior',
           prior_source='sweep',
           prior_eps=1e-6,
           prior_momentum=0.9,
           center_momentum=0.9,
           sinkhorn_iters=3,
           student_temp=0.1,
           teacher_temp=0.04))
  cfg.update(overrides)
  return cfg


def random_logits(n=12, k=7, scale=1.0):
  return (scale * RNG.standard_normal((n, k))).astype(np.float32)


def test_prior_targets_divide_posterior_by_prior():
  logits, temp = random_logits(), 0.07
  prior = RNG.dirichlet(np.ones(7)).astype(np.float32)
  posterior = np_softmax(logits / temp)
  expected = (posterior / prior) / (posterior / prior).sum(-1, keepdims=True)  # eq. 14
  got = objective.prior_normalised_targets(logits, jnp.log(prior), temp)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6)


def test_regularised_log_prior_floors_and_renormalises():
  prob_sum = np.array([3.0, 0.0, 1.0, 0.0], np.float32)
  eps = 0.01
  prior = np.maximum(prob_sum / 4.0, eps)
  expected = np.log(prior / prior.sum())
  got = objective.regularised_log_prior(jnp.asarray(prob_sum), 4.0, eps)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert np.isfinite(np.asarray(got)).all()


def test_batch_prior_source_uses_batch_marginal():
  logits, temp = random_logits(), 0.1
  posterior = np_softmax(logits / temp)
  prior = posterior.mean(0)
  expected = (posterior / prior) / (posterior / prior).sum(-1, keepdims=True)
  norm = objective.get_normalization(objective_config(prior_source='batch'))
  state = objective.init_norm_state(7)
  got = norm.targets(jnp.asarray(logits), state, temp)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6)


def test_ema_prior_source_updates_running_prior():
  cfg = objective_config(prior_source='ema', prior_momentum=0.8)
  logits, temp = random_logits(), 0.1
  norm = objective.get_normalization(cfg)
  old_prior = RNG.dirichlet(np.ones(7)).astype(np.float32)
  state = {'log_prior': jnp.log(old_prior), 'center': jnp.zeros(7)}
  new = norm.update(state, jnp.asarray(logits), temp)
  expected = 0.8 * old_prior + 0.2 * np_softmax(logits / temp).mean(0)
  np.testing.assert_allclose(np.exp(new['log_prior']), expected / expected.sum(), rtol=1e-4)
  # The targets use the state's prior (before the update), as DINO's center does.
  got = norm.targets(jnp.asarray(logits), state, temp)
  posterior = np_softmax(logits / temp)
  want = (posterior / old_prior) / (posterior / old_prior).sum(-1, keepdims=True)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def test_center_targets_and_update():
  cfg = objective_config(normalization='center', center_momentum=0.9)
  logits, temp = random_logits(), 0.04
  center = RNG.standard_normal(7).astype(np.float32)
  state = {'log_prior': jnp.zeros(7), 'center': jnp.asarray(center)}
  norm = objective.get_normalization(cfg)
  np.testing.assert_allclose(norm.targets(jnp.asarray(logits), state, temp),
                             np_softmax((logits - center) / temp),
                             rtol=2e-4,
                             atol=1e-6)
  new = norm.update(state, jnp.asarray(logits), temp)
  np.testing.assert_allclose(new['center'], 0.9 * center + 0.1 * logits.mean(0), rtol=1e-5)


def np_sinkhorn(logits, temp, iters):
  """SwAV's algorithm in the probability domain, float64 (no overflow at these scales)."""
  q = np.exp(logits.astype(np.float64) / temp).T  # [K, B]
  k, b = q.shape
  q /= q.sum()
  for _ in range(iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  return (q * b).T


def test_sinkhorn_matches_probability_domain_algorithm():
  logits, temp = random_logits(scale=0.3), 0.1
  got = objective.sinkhorn_targets(jnp.asarray(logits), temp, 3)
  np.testing.assert_allclose(got, np_sinkhorn(logits, temp, 3), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, rtol=1e-5)


def test_sinkhorn_log_space_does_not_overflow_at_low_temperature():
  logits = random_logits(scale=5.0)  # exp(5 / 0.04) overflows float32
  got = np.asarray(objective.sinkhorn_targets(jnp.asarray(logits), 0.04, 3))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('name', ['teacher_bn', 'none'])
def test_plain_softmax_targets(name):
  cfg = objective_config(normalization=name)
  logits, temp = random_logits(), 0.05
  norm = objective.get_normalization(cfg)
  got = norm.targets(jnp.asarray(logits), objective.init_norm_state(7), temp)
  np.testing.assert_allclose(got, np_softmax(logits / temp), rtol=2e-4, atol=1e-6)
  assert norm.standardise_teacher_embedding == (name == 'teacher_bn')


def test_multicrop_cross_entropy_skips_same_view_pairs():
  b, g, v, k = 5, 2, 6, 7
  targets = np_softmax(RNG.standard_normal((b, g, k)))
  student = RNG.standard_normal((b, v, k)).astype(np.float32)
  log_p = np.log(np_softmax(student / 0.1))
  total, pairs = 0.0, 0
  for i in range(g):
    for j in range(v):
      if i != j:
        total += np.mean(-np.sum(targets[:, i] * log_p[:, j], axis=-1))
        pairs += 1
  got = objective.multicrop_cross_entropy(jnp.asarray(targets), jnp.asarray(student), 0.1)
  np.testing.assert_allclose(got, total / pairs, rtol=1e-5)


def test_mutual_information_and_jensen_gap():
  probs = np_softmax(random_logits(scale=3.0))
  mean = probs.mean(0)
  h = lambda p: -np.sum(p * np.log(p), axis=-1)
  np.testing.assert_allclose(objective.cluster_mutual_information(jnp.asarray(probs)),
                             h(mean) - h(probs).mean(),
                             rtol=1e-4)
  collapsed = np.tile(probs[:1], (12, 1))
  assert abs(float(objective.cluster_mutual_information(jnp.asarray(collapsed)))) < 1e-5

  logits, temp = random_logits(), 0.1
  log_prior = np.log(RNG.dirichlet(np.ones(7)))
  mean_logits = logits.mean(0)
  p = np_softmax(logits / temp - log_prior)
  q = np_softmax((logits - mean_logits) / temp)
  expected = np.sum(p * (np.log(p) - np.log(q)), axis=-1)
  got = objective.jensen_gap(jnp.asarray(logits), jnp.asarray(log_prior), jnp.asarray(mean_logits),
                             temp)
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6)


def test_jensen_approximation_is_close_when_prior_is_the_dataset_marginal():
  # With small logits compared with tau, exp is nearly linear and the bound is tight (eq. 17-23).
  logits, temp = random_logits(n=400, scale=0.002), 0.07
  log_prior = np.log(np_softmax(logits / temp).mean(0))
  gap = objective.jensen_gap(jnp.asarray(logits), jnp.asarray(log_prior),
                             jnp.asarray(logits.mean(0)), temp)
  assert float(jnp.mean(gap)) < 1e-5
  big = random_logits(n=400, scale=1.0)
  log_prior_big = np.log(np_softmax(big / temp).mean(0))
  gap_big = objective.jensen_gap(jnp.asarray(big), jnp.asarray(log_prior_big),
                                 jnp.asarray(big.mean(0)), temp)
  assert float(jnp.mean(gap_big)) > 100 * float(jnp.mean(gap))


@pytest.mark.parametrize('overrides, fragment', [
    (dict(normalization='bogus'), "unknown objective.normalization 'bogus'"),
    (dict(prior_source='bogus'), "unknown objective.prior_source 'bogus'"),
])
def test_unknown_normalisation_is_refused(overrides, fragment):
  with pytest.raises(ValueError, match=fragment):
    objective.get_normalization(objective_config(**overrides))


# DINOv2's losses against tests/torch_dinov2.py's transcriptions.


def _masked_patches(seed=3, crops=6, patches=10, prototypes=12):
  rng = np.random.default_rng(seed)
  masks = rng.random((crops, patches)) < 0.3
  masks[0] = False  # a crop without masks counts 0 in the mean over crops
  count = int(masks.sum())
  student = rng.standard_normal((count, prototypes)).astype(np.float32)
  teacher = rng.standard_normal((count, prototypes)).astype(np.float32)
  return masks, student, teacher


def test_masked_patch_cross_entropy_equals_dinov2s_with_padding_rows():
  import torch  # pylint: disable=import-outside-toplevel
  from tests import torch_dinov2  # pylint: disable=import-outside-toplevel
  masks, student, teacher = _masked_patches()
  targets = np.array(jax.nn.softmax(teacher / 0.04, axis=-1))  # a writable copy for torch
  expected = torch_dinov2.ibot_patch_loss_masked(torch.from_numpy(student),
                                                 torch.from_numpy(targets), torch.from_numpy(masks),
                                                 0.1)
  weights = np.repeat(1 / np.maximum(masks.sum(1), 1), masks.sum(1))
  pad = 5  # the static upper bound's rows beyond the masked patches: weight 0
  got = objective.masked_patch_cross_entropy(
      jnp.asarray(np.concatenate([targets,
                                  np.full((pad, targets.shape[1]), 1e3, np.float32)])),
      jnp.asarray(np.concatenate([student, np.zeros((pad, student.shape[1]), np.float32)])),
      jnp.asarray(np.concatenate([weights, np.zeros(pad)]).astype(np.float32)), masks.shape[0], 0.1)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


def test_sinkhorn_over_the_valid_rows_equals_dinov2s_patch_sinkhorn():
  import torch  # pylint: disable=import-outside-toplevel
  from tests import torch_dinov2  # pylint: disable=import-outside-toplevel
  _, _, teacher = _masked_patches()
  expected = torch_dinov2.sinkhorn_knopp_teacher(torch.from_numpy(teacher), 0.5).numpy()
  padded = np.concatenate([teacher, RNG.standard_normal((4, teacher.shape[1])) * 50])
  valid = np.arange(len(padded)) < len(teacher)
  got = np.asarray(
      objective.sinkhorn_targets(jnp.asarray(padded, jnp.float32), 0.5, 3, jnp.asarray(valid)))
  np.testing.assert_allclose(got[:len(teacher)], expected, rtol=1e-4, atol=1e-6)
  assert np.isfinite(got).all() and (got[len(teacher):] == 0).all()
  # All rows valid: the same as without `valid`.
  np.testing.assert_allclose(objective.sinkhorn_targets(jnp.asarray(teacher), 0.5, 3),
                             objective.sinkhorn_targets(jnp.asarray(teacher), 0.5, 3,
                                                        jnp.ones(len(teacher), bool)),
                             rtol=1e-6)


def test_koleo_equals_dinov2s_and_its_gradient_too():
  import torch  # pylint: disable=import-outside-toplevel
  from tests import torch_dinov2  # pylint: disable=import-outside-toplevel
  embeddings = RNG.standard_normal((16, 8)).astype(np.float32)
  reference = torch.from_numpy(embeddings).requires_grad_()
  expected = torch_dinov2.koleo_loss(reference)
  expected.backward()
  got, gradient = jax.value_and_grad(objective.koleo)(jnp.asarray(embeddings))
  np.testing.assert_allclose(float(got), float(expected.detach()), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gradient), reference.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name', ['center', 'prior'])
def test_batch_statistics_count_only_valid_rows(name):
  config = objective_config(normalization=name, prior_source='batch')
  normalization = objective.get_normalization(config)
  logits = RNG.standard_normal((6, 5)).astype(np.float32)
  padded = np.concatenate([logits, RNG.standard_normal((3, 5)).astype(np.float32) * 30])
  valid = jnp.arange(9) < 6
  state = objective.init_norm_state(5)
  np.testing.assert_allclose(normalization.targets(jnp.asarray(padded), state, 0.1, valid)[:6],
                             normalization.targets(jnp.asarray(logits), state, 0.1),
                             rtol=1e-5)
  np.testing.assert_allclose(normalization.update(state, jnp.asarray(padded), 0.1, valid)['center'],
                             normalization.update(state, jnp.asarray(logits), 0.1)['center'],
                             rtol=1e-5)
