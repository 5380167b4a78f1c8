"""DINO's linear evaluation protocol as pure functions: heads, optimiser, train and eval steps.

As DINO's eval_linear.py: a Linear(F, C) head on frozen features (weight N(0, 0.01^2), bias 0),
the batch-mean cross-entropy, SGD with momentum 0.9 in PyTorch's form and no weight decay, lr =
base_lr * global_batch / 256 annealed by a cosine stepped once per epoch (constant within an
epoch), top-1 and top-5 on the eval split. As DINOv2's, several heads, one per base lr, train at
once on one backbone pass, stacked along a leading head axis, each on its own loss. Batches are
{'image', 'label', 'mask'}; masked rows (padding) count nowhere. No I/O and no shardings here: the
caller (kldino/modes/linear_eval.py) jits the steps. The protocol in full: docs/evaluation.md.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

INIT_STD = 0.01  # the standard deviation of DINO's linear classifier weights
REFERENCE_BATCH = 256  # lr = base_lr * global_batch / REFERENCE_BATCH
TOP_K = 5

FeatureFn = Callable[..., jax.Array]  # (backbone_params, images [B, ...]) -> features [B, F]


def init_heads(key, learning_rates: Sequence[float], feature_dim: int,
               num_classes: int) -> dict[str, jax.Array]:
  """One linear head per learning rate, stacked: {'kernel': [H, F, C], 'bias': [H, C]}.

  Each kernel entry is drawn independently from N(0, INIT_STD^2); the biases are zero.
  """
  num_heads = len(learning_rates)
  kernel = INIT_STD * jax.random.normal(key, (num_heads, feature_dim, num_classes), jnp.float32)
  return {'kernel': kernel, 'bias': jnp.zeros((num_heads, num_classes), jnp.float32)}


def scaled_learning_rates(learning_rates: Sequence[float], batch_size: int) -> jax.Array:
  """[H] learning rates of epoch 0: base_lr * global batch / 256."""
  return jnp.asarray(learning_rates, jnp.float32) * (batch_size / REFERENCE_BATCH)


def epoch_cosine(step, *, steps_per_epoch: int, epochs: int) -> jax.Array:
  """The lr factor at a step: (1 + cos(pi * epoch / epochs)) / 2, epoch = step // steps_per_epoch.

  This is CosineAnnealingLR(T_max=epochs, eta_min=0) stepped once per epoch.
  """
  epoch = jnp.asarray(step) // steps_per_epoch
  return 0.5 * (1.0 + jnp.cos(math.pi * epoch.astype(jnp.float32) / epochs))


def _scale_by_head(factors: jax.Array) -> optax.GradientTransformation:
  """Multiplies head h's updates by factors[h] (leaves have the head axis first)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params

    def scale(update):
      per_head = factors.reshape((-1,) + (1,) * (update.ndim - 1))
      return (per_head * update).astype(update.dtype)

    return jax.tree.map(scale, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(learning_rates: Sequence[float],
                   *,
                   batch_size: int,
                   steps_per_epoch: int,
                   epochs: int,
                   momentum: float = 0.9) -> optax.GradientTransformation:
  """SGD with momentum for stacked heads, head h with lr learning_rates[h] * batch_size / 256.

  `batch_size` is the global batch. The update at step t (0-based) is
  -lr_h * epoch_cosine(t) * buf_t with buf_t = momentum * buf_{t-1} + grad_t and buf_{-1} = 0:
  PyTorch's SGD(momentum, dampening=0, nesterov=False, weight_decay=0), whose first step sets
  the buffer to the gradient, with the lr of the current epoch.
  """
  if steps_per_epoch < 1 or epochs < 1:
    raise ValueError(f'steps_per_epoch={steps_per_epoch} and epochs={epochs} must both be '
                     'positive: the linear evaluation needs at least one step')
  lrs = scaled_learning_rates(learning_rates, batch_size)
  return optax.chain(
      optax.trace(decay=momentum, nesterov=False), _scale_by_head(-lrs),
      optax.scale_by_schedule(
          lambda step: epoch_cosine(step, steps_per_epoch=steps_per_epoch, epochs=epochs)))


def head_logits(heads, features) -> jax.Array:
  """[H, B, C] logits of every head for features [B, F], in float32."""
  features = features.astype(jnp.float32)
  logits = jnp.einsum('bf,hfc->hbc', features, heads['kernel'], precision=jax.lax.Precision.HIGHEST)
  return logits + heads['bias'][:, None, :]


def head_losses(heads, features, labels, mask) -> jax.Array:
  """[H]: each head's mean cross-entropy over the rows where mask is True (0 if there are none)."""
  logits = head_logits(heads, features)
  labels = jnp.broadcast_to(labels.astype(jnp.int32), logits.shape[:2])
  per_row = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [H, B]
  weights = mask.astype(jnp.float32)
  return (per_row * weights).sum(axis=1) / jnp.maximum(weights.sum(), 1.0)


def loss_fn(heads, features, labels, mask) -> jax.Array:
  """The sum over heads of head_losses: head h's gradient is that of its own mean CE."""
  return head_losses(heads, features, labels, mask).sum()


def make_train_step(feature_fn: FeatureFn, optimizer: optax.GradientTransformation):
  """train_step(heads, opt_state, backbone_params, batch) -> (heads, opt_state, metrics).

  The backbone is frozen: its features are computed under stop_gradient and only the heads
  change. metrics is an [H] array: each head's mean cross-entropy on the batch before the update.
  """

  def objective(heads, features, labels, mask):
    losses = head_losses(heads, features, labels, mask)
    return losses.sum(), losses

  def train_step(heads, opt_state, backbone_params, batch):
    features = jax.lax.stop_gradient(feature_fn(backbone_params, batch['image']))
    grads, losses = jax.grad(objective, has_aux=True)(heads, features, batch['label'],
                                                      batch['mask'])
    updates, opt_state = optimizer.update(grads, opt_state, heads)
    return optax.apply_updates(heads, updates), opt_state, losses

  return train_step


def head_counts(heads, features, labels, mask) -> dict[str, jax.Array]:
  """{'top1': [H], 'top5': [H], 'count': []} of every head on features [B, F].

  Counts (int32) over the rows where mask is True: top1 = rows whose largest logit is the label,
  top5 = rows whose label is among the 5 largest logits (with fewer than 5 classes, among all of
  them, so every row), count = the rows. Accuracy = top1 / count summed over the eval batches.
  """
  logits = head_logits(heads, features)
  num_classes = logits.shape[-1]
  _, top = jax.lax.top_k(logits, min(TOP_K, num_classes))  # [H, B, k], largest first
  hits = top == labels.astype(top.dtype)[None, :, None]
  return {
      'top1': (hits[..., 0] & mask[None, :]).sum(axis=1, dtype=jnp.int32),
      'top5': (hits.any(axis=-1) & mask[None, :]).sum(axis=1, dtype=jnp.int32),
      'count': mask.sum(dtype=jnp.int32)
  }


def evaluated_after(epochs_done: int, *, every_epochs: int, epochs: int) -> bool:
  """Whether the heads are scored after `epochs_done` epochs of `epochs`: DINO's eval_linear.py
  validates after 0-based epoch e when e % val_freq == 0 or e == epochs - 1, i.e. after epochs
  1, 1 + k, 1 + 2k, ... and the last (k = every_epochs)."""
  return 1 <= epochs_done <= epochs and ((epochs_done - 1) % every_epochs == 0 or
                                         epochs_done == epochs)


def best_over_epochs(evaluations: Sequence[dict], learning_rates: Sequence[float]) -> dict:
  """DINO's reported figure: the best top-1 over the evaluated epochs and the heads (DINOv2's lr
  sweep keeps the best head), as {'best_top1', 'best_top5' (the same head's), 'best_epoch',
  'best_lr'}; the earliest epoch, then the first head, on a tie; {} without evaluations.
  `evaluations`: {'epoch', 'top1': [H], 'top5': [H]} each, heads in learning_rates' order."""
  best = {}
  for evaluation in sorted(evaluations, key=lambda evaluation: evaluation['epoch']):
    for lr, top1, top5 in zip(learning_rates, evaluation['top1'], evaluation['top5']):
      if not best or top1 > best['best_top1']:
        best = {
            'best_top1': top1,
            'best_top5': top5,
            'best_epoch': evaluation['epoch'],
            'best_lr': lr
        }
  return best
