"""A linear probe on frozen features: softmax regression with a held-out weight-decay choice.

Features are standardised with the statistics of the rows the probe is fitted on. The weight
decay is an L2 penalty (wd / 2) * |W|^2 on the objective (no decay on the bias), so that a value
means the same thing whatever the learning rate; it corresponds to sklearn's
LogisticRegression(C=1 / (n * wd)). It is chosen by accuracy on a deterministic 10% of the train
rows; the probe is then refitted on all train rows and scored on the test rows.

All candidate weight decays are trained at once (vmapped), and the whole optimisation (epochs
of shuffled minibatches) is one jitted computation.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

HELD_OUT_FRACTION = 0.1
PEAK_LEARNING_RATE = 0.01


def _standardise(fit_features, other_features):
  mean = fit_features.mean(axis=0)
  # The floor keeps constant feature dimensions (e.g. always-zero pixels) at zero.
  std = np.maximum(fit_features.std(axis=0), 1e-6)
  return (fit_features - mean) / std, (other_features - mean) / std


def _held_out_split(num_rows: int, seed: int):
  """(fit rows, held-out rows): a seeded permutation, so the split is deterministic."""
  order = np.random.default_rng(seed).permutation(num_rows)
  num_held_out = max(1, round(HELD_OUT_FRACTION * num_rows))
  return order[num_held_out:], order[:num_held_out]


def _cross_entropy(params, features, labels):
  logits = features @ params['kernel'] + params['bias']
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _optimizer(weight_decay, total_steps: int) -> optax.GradientTransformation:
  # Decay added to the gradient before Adam = an L2 penalty on the objective (see the docstring).
  return optax.chain(optax.add_decayed_weights(weight_decay, mask={
      'kernel': True,
      'bias': False
  }), optax.adam(optax.cosine_decay_schedule(PEAK_LEARNING_RATE, total_steps)))


@functools.partial(jax.jit, static_argnames=('num_classes', 'epochs', 'batch_size'))
def _fit(features, labels, weight_decays, key, *, num_classes, epochs, batch_size):
  """Probe parameters for every weight decay, stacked along a leading axis."""
  num_rows, dim = features.shape
  # Each epoch is a fresh shuffle cut into full batches; the few rows left over change each epoch.
  steps_per_epoch = num_rows // batch_size
  epoch_keys = jax.random.split(key, epochs)

  def fit_one(weight_decay):
    optimizer = _optimizer(weight_decay, epochs * steps_per_epoch)
    params = {'kernel': jnp.zeros((dim, num_classes)), 'bias': jnp.zeros((num_classes,))}

    def step(carry, rows):
      params, opt_state = carry
      grads = jax.grad(_cross_entropy)(params, features[rows], labels[rows])
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    def epoch(carry, epoch_key):
      order = jax.random.permutation(epoch_key, num_rows)[:steps_per_epoch * batch_size]
      return jax.lax.scan(step, carry, order.reshape(steps_per_epoch, batch_size))[0], None

    return jax.lax.scan(epoch, (params, optimizer.init(params)), epoch_keys)[0][0]

  return jax.vmap(fit_one)(weight_decays)


def _accuracies(stacked_params, features, labels) -> np.ndarray:
  """Accuracy of each stacked probe on (features, labels)."""
  params = jax.device_get(stacked_params)
  logits = np.einsum('nd,wdc->wnc', features, params['kernel']) + params['bias'][:, None]
  return np.mean(logits.argmax(axis=-1) == labels, axis=-1)


def _fit_and_score(fit_features, fit_labels, eval_features, eval_labels, weight_decays, *,
                   num_classes, epochs, batch_size, seed) -> np.ndarray:
  fit_features, eval_features = _standardise(fit_features, eval_features)
  params = _fit(jnp.asarray(fit_features),
                jnp.asarray(fit_labels),
                jnp.asarray(weight_decays, jnp.float32),
                jax.random.key(seed),
                num_classes=num_classes,
                epochs=epochs,
                batch_size=min(batch_size, fit_features.shape[0]))
  return _accuracies(params, eval_features, eval_labels)


def _check_inputs(train_features, train_labels, test_features, test_labels, num_classes, epochs,
                  batch_size, weight_decays):
  if train_features.ndim != 2 or test_features.shape[1:] != train_features.shape[1:]:
    raise ValueError(f'features must be 2-D with equal widths, got train '
                     f'{train_features.shape} and test {test_features.shape}')
  if (train_labels.shape != train_features.shape[:1] or
      test_labels.shape != test_features.shape[:1]):
    raise ValueError('labels must be 1-D with one entry per feature row')
  if min(train_features.shape[0], test_features.shape[0]) < 1:
    raise ValueError('train and test sets must both have rows')
  if num_classes < 1 or min(train_labels.min(), test_labels.min()) < 0 or max(
      train_labels.max(), test_labels.max()) >= num_classes:
    raise ValueError(f'labels must lie in [0, num_classes={num_classes})')
  if epochs < 1 or batch_size < 1:
    raise ValueError(f'epochs={epochs} and batch_size={batch_size} must be >= 1')
  if len(weight_decays) < 1 or min(weight_decays) < 0:
    raise ValueError(f'weight_decays={weight_decays} must be a non-empty list of values >= 0')
  if len(weight_decays) > 1 and train_features.shape[0] < 2:
    raise ValueError('choosing a weight decay needs at least 2 train rows (one held out)')


def linear_probe(train_features,
                 train_labels,
                 test_features,
                 test_labels,
                 *,
                 num_classes: int,
                 epochs: int = 100,
                 batch_size: int = 256,
                 seed: int = 0,
                 weight_decays=(0.0, 1e-4, 1e-3, 1e-2)) -> dict:
  """Test top-1 accuracy of a softmax-regression probe, and the weight decay it chose."""
  train_features = np.asarray(train_features, np.float32)
  train_labels = np.asarray(train_labels, np.int32)
  test_features = np.asarray(test_features, np.float32)
  test_labels = np.asarray(test_labels, np.int32)
  weight_decays = [float(value) for value in weight_decays]
  _check_inputs(train_features, train_labels, test_features, test_labels, num_classes, epochs,
                batch_size, weight_decays)
  options = dict(num_classes=num_classes, epochs=epochs, batch_size=batch_size, seed=seed)
  chosen = weight_decays[0]
  if len(weight_decays) > 1:
    fit_rows, held_out_rows = _held_out_split(train_features.shape[0], seed)
    held_out_accuracies = _fit_and_score(train_features[fit_rows], train_labels[fit_rows],
                                         train_features[held_out_rows], train_labels[held_out_rows],
                                         weight_decays, **options)
    # argmax takes the first best, i.e. the earliest value in the caller's order on a tie.
    chosen = weight_decays[int(np.argmax(held_out_accuracies))]
  top1 = _fit_and_score(train_features, train_labels, test_features, test_labels, [chosen],
                        **options)[0]
  return {'top1': float(top1), 'weight_decay': chosen}
