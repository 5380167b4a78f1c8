"""The full-dataset cluster-prior sweep (paper eq. 15): Q(k) = (1/N) sum_i P_t(k|x_i).

A separate jitted, sharded function over the whole training set, run before training and every T
epochs. Each example is counted exactly once: the input pipeline pads the last batch (and gives
processes with fewer examples all-masked batches, so that every process runs the same number of
sweep steps), and the padding is masked out of every sum. The sums over the global batch are
reduced across devices and hosts by the compiler.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kldino import forward
from kldino import objective
from kldino import sharding


def init_sums(num_prototypes: int) -> dict:
  # Separate buffers: the accumulator is donated, and one buffer cannot be donated twice.
  return {name: jnp.zeros((num_prototypes,), jnp.float32)
          for name in ('prob_sum', 'logit_sum', 'assignments')} | {
              'count': jnp.zeros((), jnp.float32)}


def make_accumulate(graphdef, standardise: bool):
  """(sums, teacher_params, batch, teacher_temp) -> sums, adding one masked batch."""
  def accumulate(sums, teacher_params, batch, teacher_temp):
    mask = batch['mask']
    weight = mask.astype(jnp.float32)[:, None]
    logits = forward.teacher_logits(
        graphdef, teacher_params, batch['image'], mask=mask, standardise=standardise)
    probs = jax.nn.softmax(logits / teacher_temp, axis=-1)
    # Hard assignments by scatter-add: a [B, K] one-hot would cost as much as the softmax.
    assignments = sums['assignments'].at[jnp.argmax(logits, axis=-1)].add(weight[:, 0])
    return {
        'prob_sum': sums['prob_sum'] + jnp.sum(weight * probs, axis=0),
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
    logits = forward.teacher_logits(
        graphdef, teacher_params, batch['image'], mask=batch['mask'], standardise=standardise)
    gap = objective.jensen_gap(logits, log_prior, mean_logits, teacher_temp)
    return {'gap_sum': gap_sums['gap_sum'] + jnp.sum(jnp.where(batch['mask'], gap, 0.0)),
            'count': gap_sums['count'] + jnp.sum(batch['mask'].astype(jnp.float32))}
  return accumulate


def jit_sweep_fns(graphdef, standardise, teacher_shardings, mesh):
  replicated = sharding.replicated(mesh)
  batch = sharding.batch_sharding(mesh)
  accumulate = jax.jit(
      make_accumulate(graphdef, standardise),
      in_shardings=(replicated, teacher_shardings, batch, replicated),
      out_shardings=replicated, donate_argnums=(0,))
  gap_accumulate = jax.jit(
      make_gap_accumulate(graphdef, standardise),
      in_shardings=(replicated, teacher_shardings, batch, replicated, replicated, replicated),
      out_shardings=replicated, donate_argnums=(0,))
  return accumulate, gap_accumulate


def summarise(sums: dict, eps: float) -> dict:
  """The prior and the dataset-level diagnostics from the accumulated sums (host side)."""
  count = sums['count']
  log_prior = objective.regularised_log_prior(sums['prob_sum'], count, eps)
  prior_entropy = objective.entropy(sums['prob_sum'] / count)
  return {
      'log_prior': log_prior,
      'mean_logits': sums['logit_sum'] / count,
      'prior_entropy': prior_entropy,
      'effective_clusters': jnp.exp(prior_entropy),
      'empty_cluster_fraction': jnp.mean(sums['assignments'] == 0),
      'count': count,
  }
