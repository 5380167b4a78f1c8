"""DINO's linear evaluation: heads and optimiser against PyTorch, eval counts against numpy, the
training view and the linear training batches."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kldino.data import augment, datasets, pipeline
from kldino.evaluate import linear_eval
from tests.data.helpers import sklearn_split
from tests.helpers import config_module

RNG = np.random.default_rng(0)


def identity_features(backbone_params, images):
  del backbone_params
  return images


def numpy_cross_entropy(logits, labels):
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return -log_probs[np.arange(len(labels)), labels].mean()


# --------------------------------------------------------------------------- heads and training


def test_init_heads_shapes_and_statistics():
  heads = linear_eval.init_heads(jax.random.key(0), [0.1, 1.0, 10.0], 256, 100)
  assert heads['kernel'].shape == (3, 256, 100) and heads['bias'].shape == (3, 100)
  kernel = np.asarray(heads['kernel'])
  assert abs(kernel.std() - 0.01) < 2e-4 and abs(kernel.mean()) < 2e-4
  assert not np.array_equal(kernel[0], kernel[1])  # each head draws its own weights
  assert not np.asarray(heads['bias']).any()


def test_loss_is_the_mean_cross_entropy_over_valid_rows():
  features = RNG.normal(size=(10, 6)).astype(np.float32)
  labels = RNG.integers(0, 4, 10)
  mask = np.array([True] * 7 + [False] * 3)
  heads = linear_eval.init_heads(jax.random.key(1), [1.0, 2.0], 6, 4)
  heads = jax.tree.map(lambda x: x * 100, heads)  # logits far from uniform
  heads['bias'] = jnp.asarray(RNG.normal(size=(2, 4)), jnp.float32)
  kernel, bias = np.asarray(heads['kernel']), np.asarray(heads['bias'])
  expected = [numpy_cross_entropy(features[:7] @ kernel[h] + bias[h], labels[:7]) for h in range(2)]
  losses = linear_eval.head_losses(heads, features, labels, mask)
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  np.testing.assert_allclose(linear_eval.loss_fn(heads, features, labels, mask),
                             sum(expected),
                             rtol=1e-5)
  # Padding rows change nothing, whatever they hold.
  garbage = features.copy()
  garbage[7:] = 1e3
  np.testing.assert_allclose(linear_eval.head_losses(heads, garbage, labels, mask),
                             expected,
                             rtol=1e-5)


def test_learning_rate_is_scaled_and_constant_within_an_epoch():
  lrs = linear_eval.scaled_learning_rates([0.5, 2.0], batch_size=64)
  np.testing.assert_allclose(lrs, [0.125, 0.5])
  factors = [
      float(linear_eval.epoch_cosine(step, steps_per_epoch=3, epochs=4)) for step in range(12)
  ]
  expected = [(1 + math.cos(math.pi * (step // 3) / 4)) / 2 for step in range(12)]
  np.testing.assert_allclose(factors, expected, rtol=1e-6)
  assert factors[0] == factors[2] == 1.0 and factors[3] < 1.0


def torch_reference(kernel, bias, base_lrs, features, labels, orders, *, batch_size, epochs):
  """DINO's recipe per head in PyTorch: the trained (kernel [F, C], bias [C]) and step losses."""
  results, losses = [], []
  for h, base_lr in enumerate(base_lrs):
    linear = torch.nn.Linear(kernel.shape[1], kernel.shape[2])
    with torch.no_grad():
      linear.weight.copy_(torch.from_numpy(kernel[h].T.copy()))
      linear.bias.copy_(torch.from_numpy(bias[h].copy()))
    optimizer = torch.optim.SGD(linear.parameters(),
                                lr=base_lr * batch_size / 256.0,
                                momentum=0.9,
                                weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    head_losses = []
    for epoch in range(epochs):
      for rows in orders[epoch]:
        output = linear(torch.from_numpy(features[rows]))
        loss = torch.nn.functional.cross_entropy(output, torch.from_numpy(labels[rows]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        head_losses.append(loss.item())
      scheduler.step()
    results.append((linear.weight.detach().numpy().T, linear.bias.detach().numpy()))
    losses.append(head_losses)
  return results, np.array(losses).T  # losses [steps, H]


@pytest.fixture(scope='module')
def torch_problem():
  rng = np.random.default_rng(7)
  num_rows, dim, num_classes, batch_size, epochs = 96, 12, 5, 16, 3
  features = rng.normal(size=(num_rows, dim)).astype(np.float32)
  labels = rng.integers(0, num_classes, num_rows).astype(np.int64)
  orders = [rng.permutation(num_rows).reshape(-1, batch_size) for _ in range(epochs)]
  base_lrs = (2.0, 16.0)
  heads = linear_eval.init_heads(jax.random.key(3), base_lrs, dim, num_classes)
  heads['bias'] = jnp.asarray(rng.normal(scale=0.1, size=(2, num_classes)), jnp.float32)
  return dict(features=features,
              labels=labels,
              orders=orders,
              base_lrs=base_lrs,
              heads=heads,
              batch_size=batch_size,
              epochs=epochs)


def batch_of(problem, rows):
  return {
      'image': problem['features'][rows],
      'label': problem['labels'][rows].astype(np.int32),
      'mask': np.ones(len(rows), bool)
  }


def train_jax(problem, train_step):
  heads, losses = problem['heads'], []
  optimizer = linear_eval.make_optimizer(problem['base_lrs'],
                                         batch_size=problem['batch_size'],
                                         steps_per_epoch=len(problem['orders'][0]),
                                         epochs=problem['epochs'])
  opt_state = optimizer.init(heads)
  step = train_step(optimizer)
  for order in problem['orders']:
    for rows in order:
      heads, opt_state, head_losses = step(heads, opt_state, None, batch_of(problem, rows))
      assert head_losses.shape == (len(problem['base_lrs']),)
      losses.append(np.asarray(head_losses))
  return heads, np.array(losses)


def test_training_matches_pytorch_sgd_with_per_epoch_cosine(torch_problem):
  heads, losses = train_jax(
      torch_problem, lambda opt: jax.jit(linear_eval.make_train_step(identity_features, opt)))
  start = torch_problem['heads']
  expected, expected_losses = torch_reference(np.asarray(start['kernel']),
                                              np.asarray(start['bias']),
                                              torch_problem['base_lrs'],
                                              torch_problem['features'],
                                              torch_problem['labels'],
                                              torch_problem['orders'],
                                              batch_size=torch_problem['batch_size'],
                                              epochs=torch_problem['epochs'])
  assert losses.shape == (18, 2)
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
  for h, (kernel, bias) in enumerate(expected):
    assert not np.allclose(kernel, np.asarray(start['kernel'][h]), atol=1e-3)  # it trained
    np.testing.assert_allclose(heads['kernel'][h], kernel, atol=1e-5)
    np.testing.assert_allclose(heads['bias'][h], bias, atol=1e-5)


def test_training_with_a_sharded_batch_matches_one_device(torch_problem):
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  replicated = NamedSharding(mesh, PartitionSpec())
  rows = NamedSharding(mesh, PartitionSpec('data'))

  def sharded(optimizer):
    return jax.jit(linear_eval.make_train_step(identity_features, optimizer),
                   in_shardings=(replicated, replicated, replicated, rows),
                   out_shardings=(replicated, replicated, replicated))

  one_device, _ = train_jax(
      torch_problem, lambda opt: jax.jit(linear_eval.make_train_step(identity_features, opt)))
  eight, _ = train_jax(torch_problem, sharded)
  for key in one_device:
    np.testing.assert_allclose(eight[key], one_device[key], atol=1e-6)


def test_the_last_partial_batch_trains_as_pytorch_on_its_real_rows():
  """N = 2 * 16 + 5 rows in batches of 16, the last one padded to 16 with garbage rows masked out:
  the losses and the trained heads equal PyTorch's on DINO's DataLoader batches (drop_last=False:
  a last batch of the 5 rows, its loss their mean cross-entropy)."""
  rng = np.random.default_rng(11)
  num_rows, dim, num_classes, batch_size, epochs = 37, 12, 5, 16, 3
  features = rng.normal(size=(num_rows, dim)).astype(np.float32)
  labels = rng.integers(0, num_classes, num_rows).astype(np.int64)
  orders = [np.split(rng.permutation(num_rows), [16, 32]) for _ in range(epochs)]
  base_lrs = (2.0, 16.0)
  start = linear_eval.init_heads(jax.random.key(5), base_lrs, dim, num_classes)
  optimizer = linear_eval.make_optimizer(base_lrs,
                                         batch_size=batch_size,
                                         steps_per_epoch=3,
                                         epochs=epochs)
  step = jax.jit(linear_eval.make_train_step(identity_features, optimizer))
  heads, opt_state, losses = start, optimizer.init(start), []
  for order in orders:
    for rows in order:
      padding = batch_size - len(rows)
      batch = {
          'image': np.concatenate([features[rows],
                                   np.full((padding, dim), 1e3, np.float32)]),
          'label': np.concatenate([labels[rows], np.full(padding, 3)]).astype(np.int32),
          'mask': np.arange(batch_size) < len(rows)
      }
      heads, opt_state, head_losses = step(heads, opt_state, None, batch)
      losses.append(np.asarray(head_losses))
  expected, expected_losses = torch_reference(np.asarray(start['kernel']),
                                              np.asarray(start['bias']),
                                              base_lrs,
                                              features,
                                              labels,
                                              orders,
                                              batch_size=batch_size,
                                              epochs=epochs)
  assert [len(rows) for rows in orders[0]] == [16, 16, 5]
  np.testing.assert_allclose(np.array(losses), expected_losses, rtol=1e-5, atol=1e-6)
  for h, (kernel, bias) in enumerate(expected):
    np.testing.assert_allclose(heads['kernel'][h], kernel, atol=1e-5)
    np.testing.assert_allclose(heads['bias'][h], bias, atol=1e-5)


def test_the_backbone_gets_no_gradient():

  def feature_fn(params, images):
    return images * params['scale']

  optimizer = linear_eval.make_optimizer([1.0], batch_size=4, steps_per_epoch=1, epochs=1)
  heads = linear_eval.init_heads(jax.random.key(0), [1.0], 3, 2)
  step = linear_eval.make_train_step(feature_fn, optimizer)
  batch = {'image': jnp.ones((4, 3)), 'label': jnp.array([0, 1, 0, 1]), 'mask': jnp.ones(4, bool)}

  def through_backbone(scale):
    new_heads, _, _ = step(heads, optimizer.init(heads), {'scale': scale}, batch)
    return new_heads['kernel'].sum()

  assert float(jax.grad(through_backbone)(2.0)) == 0.0


@pytest.mark.parametrize('num_classes', [7, 3])
def test_eval_counts_match_numpy(num_classes):
  num_rows, dim, num_heads = 50, 6, 3
  features = RNG.normal(size=(num_rows, dim)).astype(np.float32)
  labels = RNG.integers(0, num_classes, num_rows).astype(np.int32)
  mask = RNG.uniform(size=num_rows) < 0.8
  heads = {
      'kernel': jnp.asarray(RNG.normal(size=(num_heads, dim, num_classes)), jnp.float32),
      'bias': jnp.asarray(RNG.normal(size=(num_heads, num_classes)), jnp.float32)
  }
  counts = jax.jit(linear_eval.head_counts)(heads, features, labels, mask)
  kernel, bias = np.asarray(heads['kernel']), np.asarray(heads['bias'])
  for h in range(num_heads):
    logits = features.astype(np.float64) @ kernel[h] + bias[h]
    ranked = np.argsort(-logits, axis=1)
    top1 = (ranked[:, 0] == labels) & mask
    top5 = (ranked[:, :5] == labels[:, None]).any(axis=1) & mask
    assert int(counts['top1'][h]) == top1.sum()
    assert int(counts['top5'][h]) == top5.sum()
  assert int(counts['count']) == mask.sum()
  assert counts['top1'].shape == counts['top5'].shape == (num_heads,)
  if num_classes < 5:
    np.testing.assert_array_equal(counts['top5'], [mask.sum()] * num_heads)
  else:
    assert (np.asarray(counts['top5']) < mask.sum()).any()


@pytest.mark.parametrize('every,epochs', [(1, 5), (2, 5), (3, 7), (10, 4), (1, 1)])
def test_evaluated_epochs_are_dinos(every, epochs):
  """DINO's eval_linear.py, transcribed: after 0-based epoch e it validates when
  `epoch % args.val_freq == 0 or epoch == args.epochs - 1`."""
  dino = [e + 1 for e in range(epochs) if e % every == 0 or e == epochs - 1]
  ours = [
      n for n in range(epochs + 2)
      if linear_eval.evaluated_after(n, every_epochs=every, epochs=epochs)
  ]
  assert ours == dino and ours[-1] == epochs


def test_best_over_epochs_is_the_first_largest_top1():
  """Against numpy's argmax over the [epochs, heads] table in (epoch, head) order, which returns
  the first largest: a tie (0.9 at epochs 3 and 5) goes to the earlier epoch; the epochs may come
  in any order; top-5 and lr are the best head's."""
  top1 = np.array([[0.5, 0.6], [0.7, 0.9], [0.8, 0.4], [0.2, 0.9]])
  top5 = top1 / 2 + 0.5
  epochs, lrs = [1, 3, 4, 5], [0.1, 1.0]
  evaluations = [{
      'epoch': epoch,
      'top1': list(top1[i]),
      'top5': list(top5[i])
  } for i, epoch in enumerate(epochs)]
  best = linear_eval.best_over_epochs(evaluations[::-1], lrs)
  row, head = np.unravel_index(np.argmax(top1), top1.shape)
  assert best == {
      'best_top1': top1[row, head],
      'best_top5': top5[row, head],
      'best_epoch': epochs[row],
      'best_lr': lrs[head]
  }
  assert (best['best_epoch'], best['best_lr']) == (3, 1.0)
  assert linear_eval.best_over_epochs([], lrs) == {}


# --------------------------------------------------------------------------- the training view


def linear_view(image, seed, **overrides):
  kwargs = dict(size=16, flip=True, mean=(0.0,) * image.shape[-1], std=(1.0,) * image.shape[-1])
  kwargs.update(overrides)
  return augment.linear_train_view(tf.constant(image), tf.constant(seed, tf.int64),
                                   **kwargs).numpy()


def test_linear_view_shape_and_determinism():
  image = RNG.uniform(0, 1, (100, 500, 3)).astype(np.float32)
  first = linear_view(image, (1, 2), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
  assert first.shape == (16, 16, 3) and first.dtype == np.float32
  assert np.isfinite(first).all()
  again = linear_view(image, (1, 2), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
  other = linear_view(image, (1, 3), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


def test_linear_view_flips_only_when_asked():
  # A left-to-right ramp; scale (1, 1) always falls back to the whole image.
  image = np.broadcast_to(np.linspace(0, 1, 500, dtype=np.float32)[None, :, None],
                          (100, 500, 1)).copy()
  unflipped = [linear_view(image, (seed, 5), flip=False, scale=(1.0, 1.0)) for seed in range(16)]
  whole = unflipped[0]
  assert (np.diff(whole[0, :, 0]) > 0).all()
  for view in unflipped:
    np.testing.assert_array_equal(view, whole)
  mirrored = 0
  for seed in range(16):
    view = linear_view(image, (seed, 5), flip=True, scale=(1.0, 1.0))
    is_mirror = np.allclose(view, whole[:, ::-1], atol=1e-6)
    assert is_mirror or np.allclose(view, whole, atol=1e-6)
    mirrored += is_mirror
  assert 0 < mirrored < 16


# --------------------------------------------------------------------------- training batches


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  config = config_module('digits').get_config()
  config.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
  return datasets.get_source(config.data), config


def epoch_of(source, config, epoch, **kwargs):
  kwargs.setdefault('batch_size', 64)
  return list(pipeline.linear_train_batches(source, config, epoch=epoch, **kwargs))


@pytest.fixture(scope='module')
def digits_epoch0(digits):
  return epoch_of(*digits, 0)


def test_linear_batches_of_digits(digits, digits_epoch0):
  source, config = digits
  size = config.data.image_size
  steps = pipeline.linear_steps_per_epoch(source, config, batch_size=64)
  assert steps == math.ceil(1347 / 64) == len(digits_epoch0) == 22
  low, high = [(value - config.data.mean[0]) / config.data.std[0] for value in (0.0, 1.0)]
  for batch in digits_epoch0:
    assert set(batch) == {'image', 'label', 'mask'}
    assert batch['image'].shape == (64, size, size, 1) and batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32 and batch['mask'].dtype == np.bool_
    assert ((0 <= batch['label']) & (batch['label'] < 10)).all()
    real = batch['image'][batch['mask']]
    assert low - 1e-5 <= real.min() and real.max() <= high + 1e-5
  # Every example once: 21 full batches and 1347 - 21 * 64 = 3 rows, then masked zero padding.
  assert [batch['mask'].sum() for batch in digits_epoch0] == [64] * 21 + [3]
  assert not digits_epoch0[-1]['image'][~digits_epoch0[-1]['mask']].any()
  labels = np.concatenate([batch['label'][batch['mask']] for batch in digits_epoch0])
  np.testing.assert_array_equal(np.bincount(labels), np.bincount(sklearn_split('train')[1]))


def test_linear_batches_are_deterministic_per_epoch(digits, digits_epoch0):
  again = epoch_of(*digits, 0)
  assert len(again) == len(digits_epoch0)
  for first, second in zip(digits_epoch0, again):
    for key in first:
      np.testing.assert_array_equal(first[key], second[key])
  epoch1 = epoch_of(*digits, 1)
  labels0 = np.concatenate([batch['label'] for batch in digits_epoch0])
  labels1 = np.concatenate([batch['label'] for batch in epoch1])
  assert len(labels1) == len(labels0) and not np.array_equal(labels0, labels1)


def test_linear_batches_resume_with_the_tail_of_the_epoch(digits, digits_epoch0):
  resumed = epoch_of(*digits, 0, start_step=5)
  assert len(resumed) == len(digits_epoch0) - 5
  for expected, got in zip(digits_epoch0[5:], resumed):
    for key in expected:
      np.testing.assert_array_equal(expected[key], got[key])


def labelled_source(num_examples: int) -> datasets.Source:
  """Random 8x8 images whose label is their position, so that labels name the examples."""
  images = RNG.integers(0, 256, (num_examples, 8, 8, 1)).astype(np.uint8)

  def read_range(split, start, stop):
    return tf.data.Dataset.from_tensor_slices({
        'image': images[start:stop],
        'label': np.arange(start, stop)
    })

  info = datasets.DatasetInfo(num_classes=num_examples,
                              num_channels=1,
                              num_examples={'train': num_examples})
  return datasets.Source(info=info, read_range=read_range)


def small_config(shards: int = 0) -> ml_collections.ConfigDict:
  config = config_module('digits').get_config()
  config.data.update(dict(image_size=8, mean=(0.0,), std=(1.0,), shards=shards))
  return config


def test_each_epoch_is_an_order_of_every_example():
  source, config = labelled_source(40), small_config()
  orders = [
      np.concatenate([batch['label']
                      for batch in epoch_of(source, config, epoch, batch_size=4)])
      for epoch in range(2)
  ]
  assert sorted(orders[0]) == sorted(orders[1]) == list(range(40))
  assert not np.array_equal(orders[0], orders[1])


@pytest.mark.parametrize('num_examples,shards,last_mask', [(11, 1, [True] * 3 + [False]),
                                                           (10, 2, [True, False] * 2)])
def test_an_epoch_of_k_batches_and_r_rows_trains_on_all_of_them(num_examples, shards, last_mask):
  """N = 2 * 4 + r examples in global batches of 4: 3 steps, every example once (labels name
  them), the padding rows masked: 11 in one shard end with 3 real rows; 10 in 2 data shards of 5
  (2 rows of each batch) end with one real row of each. A resumed epoch gives the same last
  batch."""
  source, config = labelled_source(num_examples), small_config(shards=shards)
  batches = epoch_of(source, config, 1, batch_size=4)
  assert pipeline.linear_steps_per_epoch(source, config, batch_size=4) == len(batches) == 3
  real = np.concatenate([batch['label'][batch['mask']] for batch in batches])
  assert sorted(real) == list(range(num_examples))
  assert [list(batch['mask']) for batch in batches] == [[True] * 4] * 2 + [last_mask]
  resumed = epoch_of(source, config, 1, batch_size=4, start_step=2)
  for key in batches[2]:
    np.testing.assert_array_equal(resumed[0][key], batches[2][key])


def test_linear_batches_do_not_depend_on_the_process_count():
  source, config = labelled_source(42), small_config(shards=2)
  single = epoch_of(source, config, 3, batch_size=6)
  parts = [
      epoch_of(source, config, 3, batch_size=6, process_index=index, process_count=2)
      for index in range(2)
  ]
  assert len(single) == len(parts[0]) == len(parts[1]) == 7
  for whole, first, second in zip(single, *parts):
    assert first['image'].shape == (3, 8, 8, 1)
    for key in whole:  # the global batch is process 0's rows, then process 1's
      np.testing.assert_array_equal(whole[key], np.concatenate([first[key], second[key]]))


def test_linear_batches_check_the_batch_and_the_step():
  source, config = labelled_source(12), small_config(shards=2)
  with pytest.raises(ValueError, match='multiple of the 2 data shards'):
    epoch_of(source, config, 0, batch_size=3)
  with pytest.raises(ValueError, match='start_step=4 is outside the 3 steps'):
    epoch_of(source, config, 0, batch_size=4, start_step=4)
