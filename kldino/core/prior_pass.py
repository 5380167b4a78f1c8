"""The full-dataset cluster-prior pass (paper eq. 15): Q(k) = (1/N) sum_i P_t(k|x_i).

A separate jitted, sharded function over the whole training set, run before training and every T
epochs. Each example is counted exactly once: the input pipeline pads the last batch (and gives
processes with fewer examples all-masked batches, so that every process runs the same number of
pass steps), and the padding is masked out of every sum. The sums over the global batch are
reduced across devices and hosts by the compiler.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kldino.models import forward
from kldino.core import objective
from kldino.core import sharding


def init_sums(num_prototypes: int, num_temps: int = 1, patches: bool = False) -> dict:
  """Zero sums; `prob_sum` has one row per teacher temperature the pass measures Q at. With
  `patches` (iBOT), the patch prior's too: `patch_prob_sum` [temps, K] and `patch_count` over
  every patch of every image."""
  # Separate buffers: the accumulator is donated, and one buffer cannot be donated twice.
  sums = {
      'prob_sum': jnp.zeros((num_temps, num_prototypes), jnp.float32)
  } | {
      name: jnp.zeros((num_prototypes,), jnp.float32) for name in ('logit_sum', 'assignments')
  } | {
      'count': jnp.zeros((), jnp.float32)
  }
  if patches:
    sums |= {
        'patch_prob_sum': jnp.zeros((num_temps, num_prototypes), jnp.float32),
        'patch_count': jnp.zeros((), jnp.float32)
    }
  return sums


def period_temperatures(teacher_temp, first_step: int, end_step: int) -> np.ndarray:
  """The teacher temperatures a prior must serve over steps [first_step, end_step): [mean] when
  the schedule is constant there, else [mean, first, last].

  The targets of step s are softmax(t / tau_s) / Q (eq. 14), so the exact prior for step s is Q
  measured at tau_s. One prior serves every step until the next pass; during the temperature
  warm-up tau changes over them, and the prior is measured at their mean temperature, which
  halves the largest mismatch of measuring it at the first one. The first and last temperatures
  are measured too, so that the pass can report the mismatch (`drift`).
  """
  temps = np.asarray(teacher_temp(np.arange(first_step, max(end_step, first_step + 1))), np.float32)
  if np.ptp(temps) < 1e-7:
    return temps[:1]
  return np.asarray([temps.mean(), temps[0], temps[-1]], np.float32)


def _prob_sums(logits, weight, teacher_temps):
  """[n, K]: the weighted sums of softmax(logits / t) over the rows, one per temperature."""
  return jnp.stack([
      jnp.sum(weight * jax.nn.softmax(logits / temp, axis=-1), axis=0)
      for temp in jnp.atleast_1d(teacher_temps)
  ])


def make_accumulate(graphdef, standardise: bool, patch_standardise: bool | None = None):
  """(sums, teacher_params, batch, teacher_temps [n]) -> sums, adding one masked batch; Q is
  measured at each of the n temperatures (one row of `prob_sum` each). With `patch_standardise`
  not None (iBOT: the patch normalisation's), the same teacher forward also adds every patch's
  posterior to the patch prior's sums (the seed's prior over patch prototypes)."""

  def accumulate(sums, teacher_params, batch, teacher_temps):
    mask = batch['mask']
    weight = mask.astype(jnp.float32)[:, None]
    if patch_standardise is None:
      logits = forward.teacher_logits(graphdef,
                                      teacher_params,
                                      batch['image'],
                                      mask=mask,
                                      standardise=standardise)
      patch_sums = {}
    else:
      logits, patch_logits = forward.teacher_image_outputs(graphdef,
                                                           teacher_params,
                                                           batch['image'],
                                                           mask=mask,
                                                           standardise=standardise,
                                                           patch_standardise=patch_standardise)
      patch_weight = jnp.repeat(weight, patch_logits.shape[0] // weight.shape[0], axis=0)
      patch_sums = {
          'patch_prob_sum':
              sums['patch_prob_sum'] + _prob_sums(patch_logits, patch_weight, teacher_temps),
          'patch_count':
              sums['patch_count'] + jnp.sum(patch_weight),
      }
    # Hard assignments by scatter-add: a [B, K] one-hot would cost as much as the softmax.
    assignments = sums['assignments'].at[jnp.argmax(logits, axis=-1)].add(weight[:, 0])
    return {
        'prob_sum': sums['prob_sum'] + _prob_sums(logits, weight, teacher_temps),
        'logit_sum': sums['logit_sum'] + jnp.sum(weight * logits, axis=0),
        'assignments': assignments,
        'count': sums['count'] + jnp.sum(weight),
        **patch_sums,
    }

  return accumulate


def init_gap_sums() -> dict:
  return {'gap_sum': jnp.zeros((), jnp.float32), 'count': jnp.zeros((), jnp.float32)}


def make_gap_accumulate(graphdef, standardise: bool):
  """Sums of the Jensen gap KL(prior targets || centered targets) and of the examples, over one
  masked batch. It needs the dataset-level prior, hence a second pass (over all examples or the
  first `objective.gap_examples`)."""

  def accumulate(gap_sums, teacher_params, batch, teacher_temp, log_prior, mean_logits):
    logits = forward.teacher_logits(graphdef,
                                    teacher_params,
                                    batch['image'],
                                    mask=batch['mask'],
                                    standardise=standardise)
    gap = objective.jensen_gap(logits, log_prior, mean_logits, teacher_temp)
    return {
        'gap_sum': gap_sums['gap_sum'] + jnp.sum(jnp.where(batch['mask'], gap, 0.0)),
        'count': gap_sums['count'] + jnp.sum(batch['mask'].astype(jnp.float32))
    }

  return accumulate


def init_drift_sums() -> dict:
  return {name: jnp.zeros((), jnp.float32) for name in ('first', 'last', 'first_temp', 'count')}


def make_drift_accumulate(graphdef, standardise: bool):
  """Sums over one masked batch of how far the targets of the period's first and last steps move
  when their exact priors (rows 1, 2 of `log_priors`, at temps[1], temps[2]) are replaced by the
  one measured at the mean temperature (row 0): KL(exact targets || used targets); and, for
  comparison, at the last step with the prior measured at the first temperature."""

  def accumulate(drift_sums, teacher_params, batch, temps, log_priors):
    logits = forward.teacher_logits(graphdef,
                                    teacher_params,
                                    batch['image'],
                                    mask=batch['mask'],
                                    standardise=standardise)
    weight = batch['mask'].astype(jnp.float32)

    def kl(temp, exact_log_prior, used_log_prior):
      exact = jax.nn.log_softmax(logits / temp - exact_log_prior, axis=-1)
      used = jax.nn.log_softmax(logits / temp - used_log_prior, axis=-1)
      return jnp.sum(weight * jnp.sum(jnp.exp(exact) * (exact - used), axis=-1))

    return {
        'first': drift_sums['first'] + kl(temps[1], log_priors[1], log_priors[0]),
        'last': drift_sums['last'] + kl(temps[2], log_priors[2], log_priors[0]),
        'first_temp': drift_sums['first_temp'] + kl(temps[2], log_priors[2], log_priors[1]),
        'count': drift_sums['count'] + jnp.sum(weight)
    }

  return accumulate


class PassFns(NamedTuple):
  """The jitted accumulations of a prior pass, each over one batch, donating its sums."""
  accumulate: Callable  # (sums, teacher, batch, temps) -> sums: Q(k) at each temperature
  gap_accumulate: Callable  # (sums, teacher, batch, temp, log_prior, mean_logits) -> sums
  drift_accumulate: Callable  # (sums, teacher, batch, temps, log_priors) -> sums


def jit_pass_fns(graphdef,
                 standardise,
                 teacher_shardings,
                 mesh,
                 patch_standardise: bool | None = None) -> PassFns:
  """The jitted pass functions; with `patch_standardise` not None (iBOT), `accumulate` measures
  the patch prior too."""
  replicated = sharding.replicated(mesh)
  batch = sharding.batch_sharding(mesh)
  jitted = lambda fn, num_scalars: jax.jit(fn,
                                           in_shardings=(replicated, teacher_shardings, batch,
                                                         *[replicated] * num_scalars),
                                           out_shardings=replicated,
                                           donate_argnums=(0,))
  return PassFns(accumulate=jitted(make_accumulate(graphdef, standardise, patch_standardise), 1),
                 gap_accumulate=jitted(make_gap_accumulate(graphdef, standardise), 3),
                 drift_accumulate=jitted(make_drift_accumulate(graphdef, standardise), 2))


def summarise(sums: dict, eps: float, row: int = 0) -> dict:
  """The prior (measured at temperature `row`) and the dataset-level diagnostics from the
  accumulated sums."""
  count = sums['count']
  prob_sum = sums['prob_sum'][row]
  log_prior = objective.regularised_log_prior(prob_sum, count, eps)
  prior_entropy = objective.entropy(prob_sum / count)
  summary = {
      'log_prior': log_prior,
      'mean_logits': sums['logit_sum'] / count,
      'prior_entropy': prior_entropy,
      'effective_clusters': jnp.exp(prior_entropy),
      'empty_cluster_fraction': jnp.mean(sums['assignments'] == 0),
      'count': count,
  }
  if 'patch_prob_sum' in sums:  # the prior over patch prototypes, of every patch
    patch_sum, patch_count = sums['patch_prob_sum'][row], sums['patch_count']
    patch_entropy = objective.entropy(patch_sum / patch_count)
    summary |= {
        'patch_log_prior': objective.regularised_log_prior(patch_sum, patch_count, eps),
        'patch_prior_entropy': patch_entropy,
        'patch_effective_clusters': jnp.exp(patch_entropy),
    }
  return summary


def update_due(objective_config, epoch: int, normalization: str | None = None) -> bool:
  """Whether the pass before `epoch` sets a prior the steps use: the image targets' (or those of
  `normalization`, the patch targets')."""
  normalization = normalization or objective_config.normalization
  if not objective.prior_from_pass(objective_config, normalization):
    return False
  if epoch == 0:
    return objective_config.prior_init == 'sweep'
  # The EMA source only takes its initial value from a pass; `sweep` re-estimates every T.
  return (objective_config.prior_source == 'sweep' and
          epoch % objective_config.prior_every_epochs == 0)


def pass_due(config, epoch: int) -> bool:
  """Whether a pass runs before `epoch`: to set the prior, or (eval.prior_pass_diagnostics) only
  to measure the teacher's cluster statistics every T epochs, for any normalisation."""
  diagnostic = (config.eval.prior_pass_diagnostics and
                epoch % config.objective.prior_every_epochs == 0)
  objective_config = config.objective
  patch_update = objective.uses_ibot(objective_config) and update_due(
      objective_config, epoch, objective_config.patch_normalization)
  return update_due(objective_config, epoch) or patch_update or diagnostic


class PassResult(NamedTuple):
  log_prior: jax.Array  # [K], measured at the period's mean teacher temperature
  patch_log_prior: jax.Array | None  # [K] over every patch (iBOT), or None
  scalars: dict  # prior_pass/* host floats
  histograms: dict  # prior_pass/prior and prior_pass/prototype_usage, host arrays


def measure(fns: PassFns, teacher, batches: Callable[[], Iterable[dict]], *, config, schedules,
            mesh, step: int, unit_prototypes) -> PassResult:
  """One prior pass with `teacher` before `step`: Q(k) over the whole training set (eq. 15), at
  the mean teacher temperature of the steps it will serve (period_temperatures), then the
  Jensen gap with it (over `objective.gap_examples` examples, 0: all) and, during a temperature
  warm-up, how far the targets drift from those of the exact prior. `batches()` yields the
  training set's global masked batches, once per call; `unit_prototypes` are the head's own
  (so that the 'centered' mode is measured as it is used)."""
  # The last train steps may still be queued: wait for them, or the pass's time includes them.
  jax.block_until_ready(teacher)
  start = time.time()
  period_end = min(step + config.objective.prior_every_epochs * schedules.steps_per_epoch,
                   schedules.total_steps)
  temps = period_temperatures(schedules.teacher_temp, step, period_end)
  replicated = sharding.replicated(mesh)  # as the jitted outputs: one compile, not two
  sums = jax.device_put(
      init_sums(config.model.num_prototypes, len(temps), objective.uses_ibot(config.objective)),
      replicated)
  for batch in batches():
    sums = fns.accumulate(sums, teacher, batch, temps)
  eps = config.objective.prior_eps
  summary = summarise(sums, eps)
  log_priors = jnp.stack([summarise(sums, eps, row)['log_prior'] for row in range(len(temps))])
  gap_sums = jax.device_put(init_gap_sums(), replicated)
  drift_sums = jax.device_put(init_drift_sums(), replicated)
  gap_examples = config.objective.gap_examples
  gap_batches = -(-gap_examples // config.prior_pass_batch_size) if gap_examples else None
  for batch in itertools.islice(batches(), gap_batches):
    gap_sums = fns.gap_accumulate(gap_sums, teacher, batch, temps[0], summary['log_prior'],
                                  summary['mean_logits'])
    if len(temps) > 1:
      drift_sums = fns.drift_accumulate(drift_sums, teacher, batch, temps, log_priors)
  drift_count = jnp.maximum(drift_sums['count'], 1.0)
  scalars = {
      'prior_pass/effective_clusters':
          summary['effective_clusters'],
      'prior_pass/prior_entropy':
          summary['prior_entropy'],
      'prior_pass/empty_cluster_fraction':
          summary['empty_cluster_fraction'],
      'prior_pass/jensen_gap':
          gap_sums['gap_sum'] / gap_sums['count'],
      'prior_pass/prototype_mean_norm':
          jnp.linalg.norm(jnp.mean(unit_prototypes, axis=1)),
      'prior_pass/examples':
          summary['count'],
      'prior_pass/teacher_temp':
          temps[0],
      # KL(targets with the exact prior || targets with the one used), per image, at the
      # period's first and last steps; and at its last step for a prior measured at the first
      # step's temperature. All 0 when the temperature is constant over the period.
      'prior_pass/prior_temp_drift':
          jnp.maximum(drift_sums['first'], drift_sums['last']) / drift_count,
      'prior_pass/prior_temp_drift_if_first_temp':
          drift_sums['first_temp'] / drift_count,
  }
  if 'patch_log_prior' in summary:
    scalars |= {
        'prior_pass/patch_effective_clusters': summary['patch_effective_clusters'],
        'prior_pass/patch_prior_entropy': summary['patch_prior_entropy'],
    }
  scalars = {k: float(v) for k, v in jax.device_get(scalars).items()}
  scalars['prior_pass/seconds'] = time.time() - start  # after device_get: the real duration
  histograms = {
      'prior_pass/prior': np.exp(np.asarray(jax.device_get(summary['log_prior']))),
      'prior_pass/prototype_usage': np.asarray(jax.device_get(sums['assignments']))
  }
  return PassResult(summary['log_prior'], summary.get('patch_log_prior'), scalars, histograms)


def describe(scalars: dict, epoch: int) -> str:
  """The log line of a pass's scalars."""
  return (f"prior pass before epoch {epoch}: {scalars['prior_pass/examples']:.0f} examples, "
          f"effective clusters {scalars['prior_pass/effective_clusters']:.1f}, empty "
          f"{100 * scalars['prior_pass/empty_cluster_fraction']:.1f}%, Jensen gap "
          f"{scalars['prior_pass/jensen_gap']:.4f}, tau_t {scalars['prior_pass/teacher_temp']:.4f} "
          f"(drift {scalars['prior_pass/prior_temp_drift']:.2e}), " +
          (f"patch clusters {scalars['prior_pass/patch_effective_clusters']:.1f}, "
           if 'prior_pass/patch_effective_clusters' in scalars else '') +
          f"{scalars['prior_pass/seconds']:.1f}s")
