"""Teacher normalisations, the multi-crop cross-entropy and the collapse diagnostics.

Every normalisation of docs/method.md ("Teacher normalisations") lives here, behind one registry
keyed by `objective.normalization` (and `objective.prior_source` for `prior`). Everything is a pure
function of arrays; batch statistics are means over axis 0 of arrays that, under `jax.jit` with a
batch-sharded input, span the *global* batch (the compiler inserts the all-reduce).

Equation numbers refer to Kittler, Awais, Atito (2026), "Information theoretic underpinning of
self-supervised learning by clustering".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kldino.registry import Registry

# ----------------------------------------------------------------------------- cluster prior


def regularised_log_prior(prob_sum: jax.Array, count: jax.Array, eps: float) -> jax.Array:
  """log Q(k) from a sum of teacher posteriors over `count` images (eq. 15).

  An empty cluster has Q(k) = 0 and an infinite boost; the paper asks for a regulariser: floor
  the prior at `eps` and renormalise.
  """
  prior = prob_sum / jnp.maximum(count, 1.0)
  prior = jnp.maximum(prior, eps)
  return jnp.log(prior / jnp.sum(prior))


def uniform_log_prior(num_prototypes: int) -> jax.Array:
  return jnp.full((num_prototypes,), -jnp.log(num_prototypes), jnp.float32)


def prior_normalised_targets(teacher_logits, log_prior, teacher_temp):
  """Q(k|x) = softmax_k(t_k / tau_t - log Q(k)) (eq. 14/16, in log space)."""
  return jax.nn.softmax(teacher_logits / teacher_temp - log_prior, axis=-1)


def centered_targets(teacher_logits, center, teacher_temp):
  """DINO: softmax((t - c) / tau_t), the Jensen approximation of the prior (eq. 17-23)."""
  return jax.nn.softmax((teacher_logits - center) / teacher_temp, axis=-1)


def sinkhorn_targets(teacher_logits, teacher_temp, num_iters):
  """Sinkhorn-Knopp on exp(t / tau) over the batch, in log space (no overflow at tau=0.04).

  Alternately makes every prototype carry 1/K of the mass and every image 1/B of it; the result
  is returned with rows (images) summing to one. Each prototype step divides by the batch prior:
  an iterated inverse-prior normalisation.
  """
  batch, num_prototypes = teacher_logits.shape
  log_q = teacher_logits / teacher_temp
  log_q = log_q - jax.nn.logsumexp(log_q)
  for _ in range(num_iters):
    log_q = log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True) - jnp.log(num_prototypes)
    log_q = log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True) - jnp.log(batch)
  return jnp.exp(log_q + jnp.log(batch))


def batch_log_prior(teacher_logits, teacher_temp, eps):
  """Q(k) estimated on the (global) batch: Self-Classifier's marginal."""
  probs = jax.nn.softmax(teacher_logits / teacher_temp, axis=-1)
  return regularised_log_prior(jnp.sum(probs, axis=0), probs.shape[0], eps)


# ----------------------------------------------------------------------------- registry


def init_norm_state(num_prototypes: int) -> dict:
  """One state for every normalisation, so that checkpoints have one shape whatever the switch."""
  return {
      'log_prior': uniform_log_prior(num_prototypes),
      'center': jnp.zeros((num_prototypes,), jnp.float32),
  }


class Normalization:
  """A teacher normalisation bound to its objective config: how the teacher's logits become
  targets, and how its state evolves.

  targets(teacher_logits [N, K], state, teacher_temp) -> targets [N, K]
  update(state, teacher_logits, teacher_temp) -> state, after the loss (as DINO's center).
  """
  standardise_teacher_embedding = False  # teacher_bn: batch statistics on the teacher's z

  def __init__(self, objective_config):
    self.config = objective_config

  def targets(self, teacher_logits, state, teacher_temp):
    del state
    return jax.nn.softmax(teacher_logits / teacher_temp, axis=-1)

  def update(self, state, teacher_logits, teacher_temp):
    del teacher_logits, teacher_temp
    return state


# objective.normalization -> a Normalization class (or factory) taking the objective config.
NORMALIZATIONS = Registry('normalisation', key='objective.normalization')
# objective.prior_source -> where `prior` takes Q(k) from.
PRIOR_SOURCES = Registry('prior source', key='objective.prior_source')


@PRIOR_SOURCES.register('sweep')
class DatasetPrior(Normalization):
  """Q(k) from the prior pass over the dataset (eq. 15), held in the state between passes."""

  def targets(self, teacher_logits, state, teacher_temp):
    return prior_normalised_targets(teacher_logits, state['log_prior'], teacher_temp)


@PRIOR_SOURCES.register('batch')
class BatchPrior(Normalization):
  """Q(k) of the global batch itself."""

  def targets(self, teacher_logits, state, teacher_temp):
    del state
    log_prior = batch_log_prior(teacher_logits, teacher_temp, self.config.prior_eps)
    return prior_normalised_targets(teacher_logits, log_prior, teacher_temp)


@PRIOR_SOURCES.register('ema')
class EmaPrior(DatasetPrior):
  """Q(k) as a running mean of the batches' priors (its first value from a prior pass)."""

  def update(self, state, teacher_logits, teacher_temp):
    batch_prior = jnp.exp(batch_log_prior(teacher_logits, teacher_temp, self.config.prior_eps))
    momentum = self.config.prior_momentum
    prior = momentum * jnp.exp(state['log_prior']) + (1 - momentum) * batch_prior
    return {**state, 'log_prior': jnp.log(prior / jnp.sum(prior))}


@NORMALIZATIONS.register('prior')
def _prior(objective_config) -> Normalization:
  return PRIOR_SOURCES.get(objective_config.prior_source)(objective_config)


@NORMALIZATIONS.register('center')
class Centered(Normalization):
  """DINO's centering: the Jensen approximation of the prior (eq. 17-23)."""

  def targets(self, teacher_logits, state, teacher_temp):
    return centered_targets(teacher_logits, state['center'], teacher_temp)

  def update(self, state, teacher_logits, teacher_temp):
    del teacher_temp
    momentum = self.config.center_momentum
    center = momentum * state['center'] + (1 - momentum) * jnp.mean(teacher_logits, axis=0)
    return {**state, 'center': center}


@NORMALIZATIONS.register('sinkhorn')
class Sinkhorn(Normalization):
  """SwAV's and DINOv2's equipartition of the global batch."""

  def targets(self, teacher_logits, state, teacher_temp):
    del state
    return sinkhorn_targets(teacher_logits, teacher_temp, self.config.sinkhorn_iters)


@NORMALIZATIONS.register('teacher_bn')
class TeacherBatchNorm(Normalization):
  """Plain softmax of a teacher whose embedding is standardised over the batch (paper §5)."""
  standardise_teacher_embedding = True


NORMALIZATIONS.register('none')(Normalization)  # plain softmax: the control, which collapses


def get_normalization(objective_config) -> Normalization:
  """The normalisation `objective.normalization` names, bound to the objective config; an
  unknown name or prior source raises ValueError with the choices."""
  return NORMALIZATIONS.get(objective_config.normalization)(objective_config)


def uses_prior_pass(objective_config) -> bool:
  """The prior pass sets the prior of source 'sweep' every T epochs, and the first one of 'ema'."""
  return objective_config.normalization == 'prior' and objective_config.prior_source in ('sweep',
                                                                                         'ema')


# ----------------------------------------------------------------------------- loss


def multicrop_cross_entropy(targets, student_logits, student_temp):
  """DINO's multi-crop loss, eq. 11 averaged over all (teacher view i, student view v != i).

  targets: [B, G, K] for the G global views; student_logits: [B, V, K] for all V views, the
  first G of which are the same global views (batch-major, so that a batch sharded over devices
  stays local). Returns the mean cross-entropy over the G * V - G pairs.
  """
  batch, num_global = targets.shape[:2]
  num_views = student_logits.shape[1]
  log_student = jax.nn.log_softmax(student_logits / student_temp, axis=-1)
  # ce[i, v] = mean_b -sum_k targets[b,i,k] log P_s[b,v,k]
  ce = -jnp.einsum('bik,bvk->iv', targets, log_student) / batch
  same_view = jnp.eye(num_global, num_views, dtype=bool)
  num_pairs = num_global * num_views - num_global
  return jnp.sum(jnp.where(same_view, 0.0, ce)) / num_pairs


def entropy(probs, axis=-1):
  return -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-30)), axis=axis)


def cluster_mutual_information(probs):
  """I(x; k) = H(mean_x p(k|x)) - mean_x H(p(k|x)), in nats (0 = collapse)."""
  return entropy(jnp.mean(probs, axis=0)) - jnp.mean(entropy(probs))


def target_diagnostics(teacher_logits, targets, teacher_temp):
  """Per-step diagnostics of the teacher side (all over the global batch)."""
  teacher_probs = jax.nn.softmax(teacher_logits / teacher_temp, axis=-1)
  target_prior_entropy = entropy(jnp.mean(targets, axis=0))
  return {
      'teacher_entropy': jnp.mean(entropy(teacher_probs)),
      'target_entropy': jnp.mean(entropy(targets)),
      'batch_prior_entropy': target_prior_entropy,
      'batch_effective_clusters': jnp.exp(target_prior_entropy),
      'teacher_mi': cluster_mutual_information(teacher_probs),
  }


def jensen_gap(teacher_logits, log_prior, mean_logits, teacher_temp):
  """KL(prior-normalised targets || centered targets) per image (section 5's approximation)."""
  log_prior_targets = jax.nn.log_softmax(teacher_logits / teacher_temp - log_prior, axis=-1)
  log_centered = jax.nn.log_softmax((teacher_logits - mean_logits) / teacher_temp, axis=-1)
  return jnp.sum(jnp.exp(log_prior_targets) * (log_prior_targets - log_centered), axis=-1)
