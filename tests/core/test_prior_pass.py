"""The prior pass counts every example exactly once, whatever the dataset and batch sizes."""
import jax
import numpy as np
import pytest

from kldino.core import program as program_lib
from kldino.models import forward
from kldino.core import prior_pass
from kldino.core import schedules
from kldino.core import sharding
from kldino.core import step
from tests.helpers import dinov2_config, tiny_config


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def padded_batches(images, batch_size):
  """The pipeline's contract: fixed-size batches, the last one padded with garbage, masked."""
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    garbage = np.full((pad, *images.shape[1:]), 1e3, np.float32)  # would dominate if counted
    yield {'image': np.concatenate([chunk, garbage]), 'mask': np.arange(batch_size) < len(chunk)}


@pytest.mark.parametrize('num_examples, batch_size', [(37, 16), (64, 16), (5, 8)])
def test_prior_pass_counts_each_example_once(num_examples, batch_size):
  config = tiny_config(head_norm='layer')  # per-image head, so batch size does not matter
  mesh = sharding.make_mesh(config.mesh)  # 8 devices
  graphdef, _ = step.build_graphdef(config, in_channels=1)
  program = program_lib.build(config, graphdef, 1, mesh, 10)
  teacher = program.init(0).teacher
  accumulate = program.prior_pass.accumulate
  images = np.random.default_rng(0).standard_normal((num_examples, 16, 16, 1)).astype(np.float32)
  temp = 0.07
  sums = prior_pass.init_sums(config.model.num_prototypes)
  for batch in padded_batches(images, batch_size):
    sums = accumulate(sums, teacher, sharding.global_batch(batch, mesh), temp)
  sums = jax.device_get(sums)

  logits = np.asarray(
      jax.jit(lambda p, x: forward.teacher_logits(graphdef, p, x))(jax.device_get(teacher), images))
  probs = np_softmax(logits / temp)
  assert sums['count'] == num_examples
  np.testing.assert_allclose(sums['prob_sum'][0], probs.sum(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sums['logit_sum'], logits.sum(0), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(sums['assignments'],
                                np.bincount(logits.argmax(-1), minlength=logits.shape[1]))
  summary = prior_pass.summarise(sums, eps=1e-6)
  prior = np.maximum(probs.mean(0), 1e-6)
  np.testing.assert_allclose(np.exp(summary['log_prior']), prior / prior.sum(), rtol=1e-4)
  np.testing.assert_allclose(summary['empty_cluster_fraction'],
                             np.mean(np.bincount(logits.argmax(-1), minlength=16) == 0))


def test_period_temperatures_mean_first_last():
  constant = schedules.epoch_warmup_then_constant(0.04, 0.04, 0, 10)
  np.testing.assert_allclose(prior_pass.period_temperatures(constant, 10, 20), [0.04])
  # 4 warm-up epochs of 10 steps: 0.04, 0.05, 0.06, 0.07, then 0.07.
  warmup = schedules.epoch_warmup_then_constant(0.04, 0.07, 4, 10)
  # Within one epoch the temperature is constant (a prior pass every epoch never drifts).
  np.testing.assert_allclose(prior_pass.period_temperatures(warmup, 10, 20), [0.05], rtol=1e-6)
  temps = np.repeat([0.05, 0.06, 0.07, 0.07], 10)  # steps 10..49
  np.testing.assert_allclose(prior_pass.period_temperatures(warmup, 10, 50),
                             [temps.mean(), 0.05, 0.07],
                             rtol=1e-6)
  np.testing.assert_allclose(prior_pass.period_temperatures(warmup, 30, 50), [0.07])


def test_prior_rows_and_drift_equal_numpy():
  config = tiny_config(head_norm='layer')
  mesh = sharding.make_mesh(config.mesh)
  graphdef, _ = step.build_graphdef(config, in_channels=1)
  program = program_lib.build(config, graphdef, 1, mesh, 10)
  teacher = program.init(0).teacher
  accumulate, _, drift_accumulate = program.prior_pass
  images = np.random.default_rng(2).standard_normal((21, 16, 16, 1)).astype(np.float32)
  temps = np.asarray([0.05, 0.04, 0.07], np.float32)
  sums = prior_pass.init_sums(config.model.num_prototypes, len(temps))
  batches = [sharding.global_batch(batch, mesh) for batch in padded_batches(images, 16)]
  for batch in batches:
    sums = accumulate(sums, teacher, batch, temps)
  logits = np.asarray(
      jax.jit(lambda p, x: forward.teacher_logits(graphdef, p, x))(jax.device_get(teacher),
                                                                   images)).astype(np.float64)
  log_priors = []
  for row, temp in enumerate(temps):
    np.testing.assert_allclose(np.asarray(sums['prob_sum'])[row],
                               np_softmax(logits / temp).sum(0),
                               rtol=1e-4,
                               atol=1e-5)
    log_priors.append(np.asarray(prior_pass.summarise(sums, 1e-6, row)['log_prior'], np.float64))
  drift = prior_pass.init_drift_sums()
  for batch in batches:
    drift = drift_accumulate(drift, teacher, batch, temps, np.asarray(log_priors, np.float32))

  def kl(temp, exact_row, used_row):
    exact = np_softmax(logits / temp - log_priors[exact_row])
    used = np_softmax(logits / temp - log_priors[used_row])
    return np.sum(exact * (np.log(exact) - np.log(used)))

  drift = jax.device_get(drift)
  assert drift['count'] == len(images)
  np.testing.assert_allclose(drift['first'], kl(temps[1], 1, 0), rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(drift['last'], kl(temps[2], 2, 0), rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(drift['first_temp'], kl(temps[2], 2, 1), rtol=1e-3, atol=1e-6)
  assert drift['first_temp'] > drift['last'] > 0


@pytest.mark.parametrize('devices', [1, 8])
def test_the_patch_prior_counts_every_patch_of_each_image_once(devices):
  """iBOT's patch prior (the seed's prior over patch prototypes): one teacher forward adds every
  patch of every real image, none of the padding, on 1 device as on 8."""
  config = dinov2_config(patch_normalization='prior')
  config.model.head_norm = 'layer'  # per-token head: the batch does not change the logits
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:devices])
  graphdef, _ = step.build_graphdef(config, in_channels=1)
  program = program_lib.build(config, graphdef, 1, mesh, 10)
  teacher = program.init(0).teacher
  images = np.random.default_rng(4).standard_normal((21, 16, 16, 1)).astype(np.float32)
  sums = prior_pass.init_sums(config.model.num_prototypes, patches=True)
  for batch in padded_batches(images, 16):
    sums = program.prior_pass.accumulate(sums, teacher, sharding.global_batch(batch, mesh), 0.07)
  sums = jax.device_get(sums)
  _, patch_logits = jax.jit(lambda p, x: forward.teacher_image_outputs(graphdef, p, x))(
      jax.device_get(teacher), images)
  patch_probs = np_softmax(np.asarray(patch_logits) / 0.07)
  assert sums['patch_count'] == 21 * 16 and sums['count'] == 21
  np.testing.assert_allclose(sums['patch_prob_sum'][0], patch_probs.sum(0), rtol=1e-4, atol=1e-4)
  summary = prior_pass.summarise(sums, eps=1e-6)
  prior = np.maximum(patch_probs.mean(0), 1e-6)
  np.testing.assert_allclose(np.exp(summary['patch_log_prior']), prior / prior.sum(), rtol=1e-4)
