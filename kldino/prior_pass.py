"""The full-dataset cluster-prior pass (paper eq. 15): Q(k) = (1/N) sum_i P_t(k|x_i).

A separate jitted, sharded function over the whole training set, run before training and every T
epochs. Each example is counted exactly once: the input pipeline pads the last batch (and gives
processes with fewer examples all-masked batches, so that every process runs the same number of
pass steps), and the padding is masked out of every sum. The sums over the global batch are
reduced across devices and hosts by the compiler.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kldino import forward
from kldino import objective
from kldino import sharding


def init_sums(num_prototypes: int, num_temps: int = 1) -> dict:
  """Zero sums; `prob_sum` has one row per teacher temperature the pass measures Q at."""
  # Separate buffers: the accumulator is donated, and one buffer cannot be donated twice.
  return {
      'prob_sum': jnp.zeros((num_temps, num_prototypes), jnp.float32)
  } | {
      name: jnp.zeros((num_prototypes,), jnp.float32) for name in ('logit_sum', 'assignments')
  } | {
      'count': jnp.zeros((), jnp.float32)
  }


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


def make_accumulate(graphdef, standardise: bool):
  """(sums, teacher_params, batch, teacher_temps [n]) -> sums, adding one masked batch; Q is
  measured at each of the n temperatures (one row of `prob_sum` each)."""

  def accumulate(sums, teacher_params, batch, teacher_temps):
    mask = batch['mask']
    weight = mask.astype(jnp.float32)[:, None]
    logits = forward.teacher_logits(graphdef,
                                    teacher_params,
                                    batch['image'],
                                    mask=mask,
                                    standardise=standardise)
    prob_sums = [
        jnp.sum(weight * jax.nn.softmax(logits / temp, axis=-1), axis=0)
        for temp in jnp.atleast_1d(teacher_temps)
    ]
    # Hard assignments by scatter-add: a [B, K] one-hot would cost as much as the softmax.
    assignments = sums['assignments'].at[jnp.argmax(logits, axis=-1)].add(weight[:, 0])
    return {
        'prob_sum': sums['prob_sum'] + jnp.stack(prob_sums),
        'logit_sum': sums['logit_sum'] + jnp.sum(weight * logits, axis=0),
        'assignments': assignments,
        'count': sums['count'] + jnp.sum(weight),
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


def jit_pass_fns(graphdef, standardise, teacher_shardings, mesh):
  replicated = sharding.replicated(mesh)
  batch = sharding.batch_sharding(mesh)
  accumulate = jax.jit(make_accumulate(graphdef, standardise),
                       in_shardings=(replicated, teacher_shardings, batch, replicated),
                       out_shardings=replicated,
                       donate_argnums=(0,))
  gap_accumulate = jax.jit(make_gap_accumulate(graphdef, standardise),
                           in_shardings=(replicated, teacher_shardings, batch, replicated,
                                         replicated, replicated),
                           out_shardings=replicated,
                           donate_argnums=(0,))
  drift_accumulate = jax.jit(make_drift_accumulate(graphdef, standardise),
                             in_shardings=(replicated, teacher_shardings, batch, replicated,
                                           replicated),
                             out_shardings=replicated,
                             donate_argnums=(0,))
  return accumulate, gap_accumulate, drift_accumulate


def summarise(sums: dict, eps: float, row: int = 0) -> dict:
  """The prior (measured at temperature `row`) and the dataset-level diagnostics from the
  accumulated sums."""
  count = sums['count']
  prob_sum = sums['prob_sum'][row]
  log_prior = objective.regularised_log_prior(prob_sum, count, eps)
  prior_entropy = objective.entropy(prob_sum / count)
  return {
      'log_prior': log_prior,
      'mean_logits': sums['logit_sum'] / count,
      'prior_entropy': prior_entropy,
      'effective_clusters': jnp.exp(prior_entropy),
      'empty_cluster_fraction': jnp.mean(sums['assignments'] == 0),
      'count': count,
  }
