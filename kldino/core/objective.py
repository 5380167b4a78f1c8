"""Teacher normalisations, the losses (DINO's multi-crop cross-entropy, iBOT's masked-patch
cross-entropy, KoLeo, DINOv3's Gram anchoring) and the collapse diagnostics.

Every normalisation of docs/method.md ("Teacher normalisations") lives here, behind one registry
keyed by `objective.normalization` (and `objective.prior_source` for `prior`); the patch targets
choose theirs from the same registry. Everything is a pure function of arrays; batch statistics
are means over axis 0 (over the rows marked `valid`, when given) of arrays that, under `jax.jit`
with a batch-sharded input, span the *global* batch (the compiler inserts the all-reduce).

Equation numbers refer to Kittler, Awais, Atito (2026), "Information theoretic underpinning of
self-supervised learning by clustering".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kldino.data import masking
from kldino.models.layers import l2_normalize
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


def _valid_rows(teacher_logits, valid):
  """(valid [N] bool, their count) of a batch whose rows are all valid when `valid` is None."""
  if valid is None:
    return jnp.ones(teacher_logits.shape[:1], bool), teacher_logits.shape[0]
  return valid, jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def sinkhorn_targets(teacher_logits, teacher_temp, num_iters, valid=None):
  """Sinkhorn-Knopp on exp(t / tau) over the batch's valid rows, in log space (no overflow at
  tau=0.04).

  Alternately makes every prototype carry 1/K of the mass and every row 1/B of it; the result
  is returned with rows (images) summing to one, invalid rows zero. Each prototype step divides
  by the batch prior: an iterated inverse-prior normalisation.
  """
  num_prototypes = teacher_logits.shape[1]
  valid, batch = _valid_rows(teacher_logits, valid)
  rows = valid[:, None]
  log_q = jnp.where(rows, teacher_logits / teacher_temp, -jnp.inf)
  log_q = log_q - jax.nn.logsumexp(log_q)
  for _ in range(num_iters):
    log_q = log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True) - jnp.log(num_prototypes)
    row_sums = jax.nn.logsumexp(jnp.where(rows, log_q, 0.0), axis=1, keepdims=True)
    log_q = jnp.where(rows, log_q - row_sums - jnp.log(batch), -jnp.inf)
  return jnp.exp(log_q + jnp.log(batch))


def batch_log_prior(teacher_logits, teacher_temp, eps, valid=None):
  """Q(k) estimated on the (global) batch's valid rows: Self-Classifier's marginal."""
  valid, count = _valid_rows(teacher_logits, valid)
  probs = jax.nn.softmax(teacher_logits / teacher_temp, axis=-1)
  return regularised_log_prior(jnp.sum(jnp.where(valid[:, None], probs, 0.0), axis=0), count, eps)


def batch_mean(teacher_logits, valid=None):
  """The mean of the batch's valid rows."""
  valid, count = _valid_rows(teacher_logits, valid)
  return jnp.sum(jnp.where(valid[:, None], teacher_logits, 0.0), axis=0) / count


# ----------------------------------------------------------------------------- registry


def init_norm_state(num_prototypes: int, patches: bool = False) -> dict:
  """One state for every normalisation, so that checkpoints have one shape whatever the switch;
  with `patches` (iBOT) the patch targets' own under 'patch'."""
  state = {
      'log_prior': uniform_log_prior(num_prototypes),
      'center': jnp.zeros((num_prototypes,), jnp.float32),
  }
  return {**state, 'patch': dict(state)} if patches else state


uses_ibot = masking.used


class Normalization:
  """A teacher normalisation bound to its objective config: how the teacher's logits become
  targets, and how its state evolves.

  targets(teacher_logits [N, K], state, teacher_temp, valid=None) -> targets [N, K]
  update(state, teacher_logits, teacher_temp, valid=None) -> state, after the loss (as DINO's
  center). `valid` [N] marks the rows that count in batch statistics (None: all).
  """
  standardise_teacher_embedding = False  # teacher_bn: batch statistics on the teacher's z

  def __init__(self, objective_config):
    self.config = objective_config

  def targets(self, teacher_logits, state, teacher_temp, valid=None):
    del state, valid
    return jax.nn.softmax(teacher_logits / teacher_temp, axis=-1)

  def update(self, state, teacher_logits, teacher_temp, valid=None):
    del teacher_logits, teacher_temp, valid
    return state


# objective.normalization -> a Normalization class (or factory) taking the objective config.
NORMALIZATIONS = Registry('normalisation', key='objective.normalization')
# objective.prior_source -> where `prior` takes Q(k) from.
PRIOR_SOURCES = Registry('prior source', key='objective.prior_source')


@PRIOR_SOURCES.register('sweep')
class DatasetPrior(Normalization):
  """Q(k) from the prior pass over the dataset (eq. 15), held in the state between passes."""

  def targets(self, teacher_logits, state, teacher_temp, valid=None):
    del valid
    return prior_normalised_targets(teacher_logits, state['log_prior'], teacher_temp)


@PRIOR_SOURCES.register('batch')
class BatchPrior(Normalization):
  """Q(k) of the global batch itself."""

  def targets(self, teacher_logits, state, teacher_temp, valid=None):
    del state
    log_prior = batch_log_prior(teacher_logits, teacher_temp, self.config.prior_eps, valid)
    return prior_normalised_targets(teacher_logits, log_prior, teacher_temp)


@PRIOR_SOURCES.register('ema')
class EmaPrior(DatasetPrior):
  """Q(k) as a running mean of the batches' priors (its first value from a prior pass)."""

  def update(self, state, teacher_logits, teacher_temp, valid=None):
    batch_prior = jnp.exp(
        batch_log_prior(teacher_logits, teacher_temp, self.config.prior_eps, valid))
    momentum = self.config.prior_momentum
    prior = momentum * jnp.exp(state['log_prior']) + (1 - momentum) * batch_prior
    return {**state, 'log_prior': jnp.log(prior / jnp.sum(prior))}


@NORMALIZATIONS.register('prior')
def _prior(objective_config) -> Normalization:
  return PRIOR_SOURCES.get(objective_config.prior_source)(objective_config)


@NORMALIZATIONS.register('center')
class Centered(Normalization):
  """DINO's centering: the Jensen approximation of the prior (eq. 17-23)."""

  def targets(self, teacher_logits, state, teacher_temp, valid=None):
    del valid
    return centered_targets(teacher_logits, state['center'], teacher_temp)

  def update(self, state, teacher_logits, teacher_temp, valid=None):
    del teacher_temp
    momentum = self.config.center_momentum
    center = momentum * state['center'] + (1 - momentum) * batch_mean(teacher_logits, valid)
    return {**state, 'center': center}


@NORMALIZATIONS.register('sinkhorn')
class Sinkhorn(Normalization):
  """SwAV's and DINOv2's equipartition of the global batch."""

  def targets(self, teacher_logits, state, teacher_temp, valid=None):
    del state
    return sinkhorn_targets(teacher_logits, teacher_temp, self.config.sinkhorn_iters, valid)


@NORMALIZATIONS.register('teacher_bn')
class TeacherBatchNorm(Normalization):
  """Plain softmax of a teacher whose embedding is standardised over the batch (paper §5)."""
  standardise_teacher_embedding = True


NORMALIZATIONS.register('none')(Normalization)  # plain softmax: the control, which collapses


def get_normalization(objective_config) -> Normalization:
  """The normalisation `objective.normalization` names, bound to the objective config; an
  unknown name or prior source raises ValueError with the choices."""
  return NORMALIZATIONS.get(objective_config.normalization)(objective_config)


def get_patch_normalization(objective_config) -> Normalization:
  """The normalisation of iBOT's patch targets (objective.patch_normalization), from the same
  registry and with the same options as the image targets'."""
  patch_config = objective_config.copy_and_resolve_references()
  patch_config.normalization = objective_config.patch_normalization
  return get_normalization(patch_config)


def prior_from_pass(objective_config, normalization: str) -> bool:
  """Whether `normalization` (the image or the patch targets') takes its prior from a pass."""
  return normalization == 'prior' and objective_config.prior_source in ('sweep', 'ema')


def uses_prior_pass(objective_config) -> bool:
  """The prior pass sets the prior of source 'sweep' every T epochs, and the first one of 'ema',
  for the image targets and (with iBOT) for the patch targets."""
  return prior_from_pass(objective_config, objective_config.normalization) or (
      uses_ibot(objective_config) and
      prior_from_pass(objective_config, objective_config.patch_normalization))


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


def masked_patch_cross_entropy(patch_targets, student_patch_logits, weights, num_crops,
                               student_temp):
  """iBOT's patch loss as DINOv2's (dinov2/loss/ibot_patch_loss.py): the cross-entropy of each
  masked patch [U, K] weighted by 1 / its crop's number of masked patches (`weights` [U], 0 for
  padding rows), summed over the patches and divided by the number of global crops: the mean
  over crops of each crop's mean over its masked patches, crops without masks counting 0."""
  log_student = jax.nn.log_softmax(student_patch_logits / student_temp, axis=-1)
  cross_entropy = -jnp.sum(patch_targets * log_student, axis=-1)
  return jnp.sum(weights * cross_entropy) / num_crops


def koleo(embeddings, eps=1e-8):
  """DINOv2's KoLeo regulariser (Sablayrolles et al. 2018; dinov2/loss/koleo_loss.py) of the
  rows of `embeddings` [N, D]: -mean log of each L2-normalised row's distance to its nearest
  other row (the Kozachenko-Leonenko entropy estimator up to constants)."""
  unit = embeddings / jnp.maximum(jnp.linalg.norm(embeddings, axis=-1, keepdims=True), eps)
  dots = jnp.where(jnp.eye(unit.shape[0], dtype=bool), -1.0, unit @ unit.T)
  nearest = unit[jnp.argmax(dots, axis=1)]
  distances = jnp.linalg.norm(unit - nearest + eps, axis=-1)  # torch's PairwiseDistance(eps)
  return -jnp.mean(jnp.log(distances + eps))


def gram_loss(student_patches,
              teacher_patches,
              *,
              normalized: bool = True,
              group: int = 0,
              remove_neg: bool = False,
              remove_only_teacher_neg: bool = False):
  """DINOv3's Gram anchoring (dinov3/loss/gram_loss.py): the mean squared difference between the
  Gram matrices of the student's and the Gram teacher's patch features [N, P, D], row by row
  L2-normalised when `normalized` (F.normalize, eps 1e-12). Per crop ([N, P, P]: img_level), or
  with `group` > 0 over the patches of each `group` consecutive crops ([N / group, gP, gP]).
  remove_neg sets both matrices' negative entries to 0; remove_only_teacher_neg the teacher's
  only (its student-side condition tests the already-cleared teacher matrix, so never holds)."""
  if normalized:
    student_patches = l2_normalize(student_patches)
    teacher_patches = l2_normalize(teacher_patches)
  if group:
    student_patches = student_patches.reshape(-1, group * student_patches.shape[1],
                                              student_patches.shape[-1])
    teacher_patches = teacher_patches.reshape(student_patches.shape)
  gram = lambda x: jnp.einsum('npd,nqd->npq', x, x, precision=jax.lax.Precision.HIGHEST)
  student_gram, teacher_gram = gram(student_patches), gram(teacher_patches)
  if remove_neg or remove_only_teacher_neg:
    teacher_gram = jnp.maximum(teacher_gram, 0.0)
  if remove_neg:
    student_gram = jnp.maximum(student_gram, 0.0)
  return jnp.mean(jnp.square(student_gram - teacher_gram))


def entropy(probs, axis=-1):
  return -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-30)), axis=axis)


def _valid_mean(values, valid, count):
  return jnp.sum(jnp.where(valid, values, 0.0)) / count


def cluster_mutual_information(probs, valid=None):
  """I(x; k) = H(mean_x p(k|x)) - mean_x H(p(k|x)) over the valid rows, in nats (0 = collapse)."""
  valid, count = _valid_rows(probs, valid)
  return entropy(batch_mean(probs, valid)) - _valid_mean(entropy(probs), valid, count)


def target_diagnostics(teacher_logits, targets, teacher_temp, valid=None):
  """Per-step diagnostics of the teacher side (all over the global batch's valid rows)."""
  teacher_probs = jax.nn.softmax(teacher_logits / teacher_temp, axis=-1)
  valid, count = _valid_rows(teacher_logits, valid)
  target_prior_entropy = entropy(batch_mean(targets, valid))
  return {
      'teacher_entropy': _valid_mean(entropy(teacher_probs), valid, count),
      'target_entropy': _valid_mean(entropy(targets), valid, count),
      'batch_prior_entropy': target_prior_entropy,
      'batch_effective_clusters': jnp.exp(target_prior_entropy),
      'teacher_mi': cluster_mutual_information(teacher_probs, valid),
  }


def jensen_gap(teacher_logits, log_prior, mean_logits, teacher_temp):
  """KL(prior-normalised targets || centered targets) per image (section 5's approximation)."""
  log_prior_targets = jax.nn.log_softmax(teacher_logits / teacher_temp - log_prior, axis=-1)
  log_centered = jax.nn.log_softmax((teacher_logits - mean_logits) / teacher_temp, axis=-1)
  return jnp.sum(jnp.exp(log_prior_targets) * (log_prior_targets - log_centered), axis=-1)
