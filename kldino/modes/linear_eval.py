"""`--mode=linear_eval`: DINO's linear evaluation of a run's frozen teacher.

The protocol (pure parts: kldino/evaluate/linear_eval.py): features of the frozen teacher backbone
(eval.n_last_blocks CLS tokens through the final norm, optionally with the average patch token),
training views RandomResizedCrop + flip, evaluation views the pipeline's; one linear head per lr
of eval.linear_lrs, all trained from one backbone pass by SGD with momentum 0.9 and a per-epoch
cosine for eval.linear_epochs epochs, every training example once an epoch (the last batch
partial). The heads are scored on the eval split (its features computed once) every
eval.linear_eval_every_epochs epochs and after the last: the last epoch's best head is reported,
and DINO's figure, the best top-1 over the evaluated epochs and heads.

The heads, their optimizer state, the step and the scores so far are checkpointed under
WORKDIR/linear_eval/step_<S>/ (S: the evaluated checkpoint's step) every `checkpoint_every_steps`
steps, at the end and on SIGTERM or Ctrl-C; the training views are a pure function of (seed,
epoch, step), so a rerun after a crash resumes and ends with the same result.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kldino import checkpoint as checkpoint_lib
from kldino.core import sharding
from kldino.data import pipeline
from kldino.errors import ConfigError
from kldino.evaluate import linear_eval as protocol
from kldino.models import forward
from kldino.run import Run
from kldino.runtime import files
from kldino.runtime import signals

# Config keys whose change makes saved heads meaningless (the run's keys are checked as well).
_PROTOCOL_KEYS = ('linear_lr', 'linear_lrs', 'linear_epochs', 'linear_batch_size',
                  'linear_crop_scale', 'n_last_blocks', 'avgpool_patchtokens')


def learning_rates(eval_config) -> tuple[float, ...]:
  return tuple(float(lr) for lr in eval_config.linear_lrs) or (float(eval_config.linear_lr),)


def _protocol_meta(config) -> dict:
  return {
      key: (list(value) if isinstance(value, tuple) else value)
      for key, value in ((k, config.eval[k]) for k in _PROTOCOL_KEYS)
  }


class _Loop:
  """The linear evaluation of one checkpoint of one run."""

  def __init__(self, run, backbone_step: int):
    config = run.config
    self.run, self.config = run, config
    self.lrs = learning_rates(config.eval)
    self.batch_size = config.eval.linear_batch_size
    run.check_training_order()
    self.steps_per_epoch = pipeline.linear_steps_per_epoch(run.source,
                                                           config,
                                                           batch_size=self.batch_size,
                                                           process_count=jax.process_count())
    self.total_steps = self.steps_per_epoch * config.eval.linear_epochs
    self.num_classes = run.source.info.num_classes
    self.feature_dim = run.feature_dim(**run.feature_options)
    options = run.feature_options

    def feature_fn(params, images):
      return forward.backbone_features(run.graphdef, params, images, **options)

    mesh = run.mesh
    replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    optimizer = protocol.make_optimizer(self.lrs,
                                        batch_size=self.batch_size,
                                        steps_per_epoch=self.steps_per_epoch,
                                        epochs=config.eval.linear_epochs)
    self.init = jax.jit(lambda key: self._init_state(key, optimizer), out_shardings=replicated)
    self.train_step = jax.jit(protocol.make_train_step(feature_fn, optimizer),
                              in_shardings=(replicated, replicated, run.param_shardings, batch),
                              out_shardings=(replicated, replicated, replicated),
                              donate_argnums=(0, 1))
    self.feature_step = jax.jit(feature_fn,
                                in_shardings=(run.param_shardings, batch),
                                out_shardings=batch)
    self.count_step = jax.jit(protocol.head_counts,
                              in_shardings=(replicated, batch, batch, batch),
                              out_shardings=replicated)
    self.eval_features = None  # [(features, labels, mask)] of the eval split's batches
    self.evaluations = []  # {'epoch', 'top1': [H], 'top5': [H]} of each evaluated epoch
    self.directory = os.path.join(run.workdir, 'linear_eval', f'step_{backbone_step}')
    self.checkpointer = checkpoint_lib.Checkpointer(self.directory,
                                                    every_steps=config.checkpoint_every_steps,
                                                    keep=2)
    self.abstract_state = jax.eval_shape(lambda: self._init_state(jax.random.key(0), optimizer))
    self.abstract_state = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
        self.abstract_state)

  def _init_state(self, key, optimizer):
    heads = protocol.init_heads(key, self.lrs, self.feature_dim, self.num_classes)
    return {'heads': heads, 'opt_state': optimizer.init(heads)}

  # ------------------------------------------------------------------------- checkpoints

  def restore_or_init(self):
    """(state, step): the newest readable checkpoint of these heads, else fresh heads."""
    if self.checkpointer.all_steps():
      saved = self.checkpointer.meta(self.checkpointer.latest_step()).get('linear_eval')
      if saved != _protocol_meta(self.config):
        raise ConfigError(
            f'{self.directory} holds heads trained with other eval.* values ({saved}): use '
            f'the same values, or delete {self.directory} to start over')
    state, meta = self.checkpointer.restore(self.abstract_state, self.config)
    if state is None:
      return self.init(jax.random.key(self.config.seed)), 0
    if meta['steps_per_epoch'] != self.steps_per_epoch:
      raise ConfigError(
          f'{self.directory} holds heads trained with {meta["steps_per_epoch"]} steps an epoch '
          f'where this evaluation takes {self.steps_per_epoch} (another dataset or data.shards, '
          'or a kldino that dropped the last partial batch): delete '
          f'{self.directory} to start over')
    self.evaluations = meta.get('linear_evals', [])
    step = meta['epoch'] * meta['steps_per_epoch'] + meta['step_in_epoch']
    logging.info('linear_eval: resuming from step %d of %d', step, self.total_steps)
    return state, step

  def save(self, state, step: int, *, force: bool = False):
    meta = checkpoint_lib.position_meta(self.config, step, self.steps_per_epoch,
                                        self.run.data_shards)
    meta['linear_eval'] = _protocol_meta(self.config)
    meta['linear_evals'] = self.evaluations
    self.checkpointer.save(step, state, meta, force=force)

  # ------------------------------------------------------------------------- training

  def _epoch_batches(self, epoch: int, start_step: int):
    local = pipeline.linear_train_batches(self.run.source,
                                          self.config,
                                          epoch=epoch,
                                          start_step=start_step,
                                          batch_size=self.batch_size,
                                          scale=tuple(self.config.eval.linear_crop_scale),
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
    return sharding.prefetch_global_batches(local, self.run.mesh)

  def _log(self, step: int, losses, started: float, first_step: int):
    elapsed = time.time() - started
    rate = (step - first_step) * self.batch_size / max(elapsed, 1e-9)
    eta = (self.total_steps - step) * elapsed / max(step - first_step, 1)
    losses = np.asarray(jax.device_get(losses))
    logging.info('linear_eval step %d/%d epoch %d | loss %s | %.1f img/s | ETA %s', step,
                 self.total_steps, (step - 1) // self.steps_per_epoch,
                 ' '.join(f'{loss:.3f}' for loss in losses), rate,
                 time.strftime('%H:%M:%S', time.gmtime(eta)))

  def train(self, teacher):
    state, start = self.restore_or_init()
    started = time.time()
    self._evaluate_if_due(state['heads'], teacher, start)  # a checkpoint saved before evaluating
    with signals.StopRequests('the linear heads') as stop:
      for epoch in range(start // self.steps_per_epoch, self.config.eval.linear_epochs):
        first = epoch * self.steps_per_epoch
        batches = self._epoch_batches(epoch, max(start - first, 0))
        for step, batch in enumerate(batches, start=max(start, first) + 1):
          heads, opt_state, losses = self.train_step(state['heads'], state['opt_state'], teacher,
                                                     batch)
          state = {'heads': heads, 'opt_state': opt_state}
          if step % self.config.log_every_steps == 0 or step == self.total_steps:
            self._log(step, losses, started, start)
          self._evaluate_if_due(heads, teacher, step)  # before any save of this step
          stop.after_step(
              step, self.checkpointer, lambda: self.save(state, step, force=True),
              f'linear_eval stopped at step {step} on request; the heads are saved: rerun the '
              'same command to resume')
          if self.checkpointer.should_save(step):
            self.save(state, step)
      if self.checkpointer.latest_step() != self.total_steps:
        self.save(state, self.total_steps, force=True)
      self.checkpointer.wait()
    return state

  # ------------------------------------------------------------------------- scoring

  def _evaluate_if_due(self, heads, teacher, step: int):
    """Scores the heads at the end of an epoch that DINO evaluates (protocol.evaluated_after),
    unless that epoch was scored already (before a resumption)."""
    epochs, within = divmod(step, self.steps_per_epoch)
    last = self.config.eval.linear_epochs
    due = not within and protocol.evaluated_after(
        epochs, every_epochs=self.config.eval.linear_eval_every_epochs, epochs=last)
    if not due or any(evaluation['epoch'] == epochs for evaluation in self.evaluations):
      return
    rows = self.score(heads, teacher)['heads']
    self.evaluations.append({
        'epoch': epochs,
        'top1': [row['top1'] for row in rows],
        'top5': [row['top5'] for row in rows]
    })
    logging.info('linear_eval epoch %d/%d: top-1 %s | best so far %.4f', epochs, last,
                 ' '.join(f'{row["top1"]:.4f}' for row in rows),
                 self.best()['best_top1'])

  def _features(self, teacher) -> list[tuple]:
    """(features, labels, mask) of the eval split's batches, computed on first use and kept on
    the devices: the backbone is frozen, so every evaluation scores the same features."""
    if self.eval_features is None:
      config = self.config
      local = pipeline.eval_batches(self.run.source,
                                    config.data.eval_split,
                                    config,
                                    batch_size=config.eval.batch_size,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
      self.eval_features = [(self.feature_step(teacher,
                                               batch['image']), batch['label'], batch['mask'])
                            for batch in sharding.prefetch_global_batches(local, self.run.mesh)]
    return self.eval_features

  def score(self, heads, teacher) -> dict:
    """Every head's top-1 and top-5 on the eval split, and the best head's."""
    totals = None
    for features, labels, mask in self._features(teacher):
      counts = self.count_step(heads, features, labels, mask)
      totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
    totals = jax.device_get(totals)
    count = float(totals['count'])
    rows = [{
        'lr': lr,
        'top1': float(top1) / count,
        'top5': float(top5) / count
    } for lr, top1, top5 in zip(self.lrs, totals['top1'], totals['top5'])]
    best = max(rows, key=lambda row: row['top1'])  # the first best on a tie
    return {
        'linear_top1': best['top1'],
        'linear_top5': best['top5'],
        'linear_lr': best['lr'],
        'heads': rows,
        'num_eval': int(count)
    }

  def best(self) -> dict:
    """DINO's figure over the epochs evaluated so far (protocol.best_over_epochs), and them."""
    return {
        **protocol.best_over_epochs(self.evaluations, self.lrs), 'evaluations': self.evaluations
    }


def run(config, workdir: str, *, step: int | None, output: str | None) -> dict:
  """Train and score the heads on the teacher of `step` (default: the latest checkpoint)."""
  opened = Run(config, workdir)
  opened.source  # pylint: disable=pointless-statement  # a bad dataset fails before anything is read
  teacher, backbone_step = opened.restore_teacher(step)
  loop = _Loop(opened, backbone_step)
  started = time.time()
  state = loop.train(teacher)
  with signals.stops_at_once(
      'while scoring the linear heads; the heads are saved: rerun the same command to score them'):
    logging.info('linear_eval: scoring the heads of step %d', loop.total_steps)
    results = {**loop.score(state['heads'], teacher), **loop.best()}
  results.update(step=backbone_step,
                 linear_steps=loop.total_steps,
                 linear_epochs=opened.config.eval.linear_epochs,
                 feature_dim=loop.feature_dim,
                 **opened.feature_options)
  logging.info(
      'linear_eval: best head lr %g: top-1 %.4f, top-5 %.4f; best over the epochs (DINO\'s): '
      'top-1 %.4f at epoch %d, lr %g (%.0f s)', results['linear_lr'], results['linear_top1'],
      results['linear_top5'], results['best_top1'], results['best_epoch'], results['best_lr'],
      time.time() - started)
  path = output or os.path.join(opened.workdir, 'linear_eval.json')
  if jax.process_index() == 0:
    files.write_json(path, results)
  return results
