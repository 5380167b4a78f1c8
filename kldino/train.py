"""The training loop: the only place with I/O and side effects.

Sections: set-up (config checks, data, mesh, state) -> initial prior sweep -> epochs of jitted
steps, with a sweep every T epochs -> final evaluation of the teacher backbone.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers

from kldino import forward
from kldino import objective
from kldino import optim
from kldino import schedules as schedules_lib
from kldino import sharding
from kldino import step as step_lib
from kldino import sweep as sweep_lib
from kldino.config_checks import ConfigError, validate_config
from kldino.data import datasets, pipeline
from kldino.evaluate import protocol


class Collapsed(RuntimeError):
  """Training stopped: the loss is not finite."""


class Trainer:
  """Holds what the loop needs: the data source, the mesh, the jitted functions, the writer."""

  def __init__(self, config, workdir: str):
    validate_config(config, jax.device_count(), jax.process_count())
    self.config = config
    self.workdir = workdir
    try:
      self.source = datasets.get_source(config.data)
    except ValueError as error:  # the data registry's one-line messages
      raise ConfigError(str(error)) from None
    self.mesh = sharding.make_mesh(config.mesh)
    info = self.source.info
    num_train = info.num_examples[config.data.train_split]
    steps_per_epoch = pipeline.steps_per_epoch(num_train, config.batch_size, jax.process_count())
    if steps_per_epoch < 1:
      raise ConfigError(f'batch_size={config.batch_size} is larger than the {num_train} training '
                        'examples: lower --config.batch_size')
    self.schedules = schedules_lib.make_schedules(config, steps_per_epoch)
    self.normalization = objective.get_normalization(config.objective)
    optimizer = optim.make_optimizer(config.optim, self.schedules)
    self.graphdef, _ = step_lib.build_graphdef(config, info.num_channels)
    init_fn = step_lib.make_init_fn(config, info.num_channels, optimizer)
    self.init, self.state_shardings = step_lib.jit_init(init_fn, self.mesh,
                                                        config.mesh.fsdp_min_size)
    self.train_step = step_lib.jit_train_step(
        step_lib.make_train_step(self.graphdef, config, self.schedules, optimizer),
        self.state_shardings, self.mesh)
    standardise = self.normalization.standardise_teacher_embedding
    self.sweep_accumulate, self.gap_accumulate = sweep_lib.jit_sweep_fns(
        self.graphdef, standardise, self.state_shardings.teacher, self.mesh)
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0)

  # --------------------------------------------------------------------------- prior sweep

  def _sweep_batches(self):
    return pipeline.eval_batches(
        self.source, self.config.data.train_split, self.config,
        batch_size=self.config.sweep_batch_size, process_index=jax.process_index(),
        process_count=jax.process_count())

  def run_sweep(self, state, epoch: int):
    """Re-estimate Q(k) with the current teacher over the whole training set (eq. 15)."""
    start = time.time()
    teacher_temp = self.schedules.teacher_temp(state.step)
    replicated = sharding.replicated(self.mesh)  # as the jitted outputs: one compile, not two
    sums = jax.device_put(sweep_lib.init_sums(self.config.model.num_prototypes), replicated)
    for batch in self._sweep_batches():
      sums = self.sweep_accumulate(sums, state.teacher, sharding.global_batch(batch, self.mesh),
                                   teacher_temp)
    summary = sweep_lib.summarise(sums, self.config.objective.prior_eps)
    gap_sum = jax.device_put(jnp.zeros(()), replicated)
    for batch in self._sweep_batches():
      gap_sum = self.gap_accumulate(gap_sum, state.teacher,
                                    sharding.global_batch(batch, self.mesh), teacher_temp,
                                    summary['log_prior'], summary['mean_logits'])
    # The head's own unit prototypes, so that the 'centered' mode is measured as it is used.
    unit = forward.unit_prototypes(self.graphdef, state.teacher)
    sweep_metrics = {
        'sweep/effective_clusters': summary['effective_clusters'],
        'sweep/prior_entropy': summary['prior_entropy'],
        'sweep/empty_cluster_fraction': summary['empty_cluster_fraction'],
        'sweep/jensen_gap': gap_sum / summary['count'],
        'sweep/prototype_mean_norm': jnp.linalg.norm(jnp.mean(unit, axis=1)),
        'sweep/examples': summary['count'],
    }
    sweep_metrics = {k: float(v) for k, v in jax.device_get(sweep_metrics).items()}
    sweep_metrics['sweep/seconds'] = time.time() - start  # after device_get: the real duration
    self.writer.write_scalars(int(state.step), sweep_metrics)
    logging.info('prior sweep before epoch %d: %d examples, effective clusters %.1f, '
                 'empty %.1f%%, Jensen gap %.4f, %.1fs', epoch, sweep_metrics['sweep/examples'],
                 sweep_metrics['sweep/effective_clusters'],
                 100 * sweep_metrics['sweep/empty_cluster_fraction'],
                 sweep_metrics['sweep/jensen_gap'], sweep_metrics['sweep/seconds'])
    norm_state = {**state.norm_state, 'log_prior': summary['log_prior']}
    return state.replace(norm_state=jax.device_put(norm_state, self.state_shardings.norm_state))

  def _sweep_due(self, epoch: int) -> bool:
    objective_config = self.config.objective
    if not objective.uses_sweep(objective_config):
      return False
    if epoch == 0:
      return objective_config.prior_init == 'sweep'
    # The EMA source only takes its initial value from a sweep; `sweep` re-estimates every T.
    return (objective_config.prior_source == 'sweep'
            and epoch % objective_config.prior_every_epochs == 0)

  # --------------------------------------------------------------------------- epochs

  def _log(self, step: int, metrics: list, images: int, seconds: float, epoch: int):
    averaged = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
    if not np.isfinite(averaged['loss']):
      raise Collapsed(f'non-finite loss at step {step}: lower optim.lr or check the data')
    averaged['images_per_sec'] = images / max(seconds, 1e-9)
    averaged['epoch'] = epoch
    self.writer.write_scalars(step, averaged)
    total = self.schedules.total_steps
    elapsed = time.time() - self._train_start  # includes the sweeps, unlike the window
    eta = (total - step) * elapsed / max(step - self._first_step, 1)
    logging.info('step %d/%d epoch %d | loss %.4f kl %.4f | teacher H %.3f target H %.3f | '
                 'clusters %.1f (prior %.1f) | lr %.2e | %.1f img/s | ETA %s', step, total, epoch,
                 averaged['loss'], averaged['kl'], averaged['teacher_entropy'],
                 averaged['target_entropy'], averaged['batch_effective_clusters'],
                 averaged['prior_effective_clusters'], averaged['lr'],
                 averaged['images_per_sec'], time.strftime('%H:%M:%S', time.gmtime(eta)))

  def train_epoch(self, state, epoch: int):
    config = self.config
    pending, images, window_start = [], 0, time.time()
    batches = pipeline.train_batches(self.source, config, epoch=epoch,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
    first_step = epoch * self.schedules.steps_per_epoch
    # The step is counted on the host: reading state.step would wait for the device every step.
    for step, batch in enumerate(batches, start=first_step + 1):
      state, metrics = self.train_step(state, sharding.global_batch(batch, self.mesh))
      pending.append(metrics)
      images += config.batch_size
      if step % config.log_every_steps == 0 or step == self.schedules.total_steps:
        pending = jax.device_get(pending)  # waits for the dispatched steps before timing them
        self._log(step, pending, images, time.time() - window_start, epoch)
        pending, images, window_start = [], 0, time.time()
    return state

  def train(self):
    config = self.config
    state = self.init(config.seed)
    self._train_start, self._first_step = time.time(), 0
    logging.info('%d parameters in the student; %d steps per epoch, %d epochs, %d devices',
                 sum(x.size for x in jax.tree.leaves(state.student)),
                 self.schedules.steps_per_epoch, config.num_epochs, jax.device_count())
    for epoch in range(config.num_epochs):
      if self._sweep_due(epoch):
        state = self.run_sweep(state, epoch)
      state = self.train_epoch(state, epoch)
      every = config.eval.every_epochs
      if every and (epoch + 1) % every == 0 and epoch + 1 < config.num_epochs:
        logging.info('epoch %d: %s', epoch, self.evaluate(state, with_linear=False))
    return state

  # --------------------------------------------------------------------------- evaluation

  def evaluate(self, state, with_linear: bool = True) -> dict:
    results = protocol.evaluate_teacher(
        self.graphdef, state.teacher, self.source, self.config, self.mesh,
        self.state_shardings.teacher,
        teacher_temp=float(self.schedules.teacher_temp(state.step)),
        standardise=self.normalization.standardise_teacher_embedding, with_linear=with_linear)
    results['step'] = int(state.step)
    self.writer.write_scalars(results['step'], {
        f'eval/{k}': v for k, v in results.items() if isinstance(v, float)})
    self.writer.flush()
    return results


def write_eval_json(results: dict, path: str):
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(results, f, indent=1, sort_keys=True)


def _baselines(trainer: Trainer) -> dict:
  """The same probes on raw pixels and on the backbone at initialisation, for comparison."""
  pixels = protocol.evaluate_pixels(trainer.source, trainer.config)
  init = trainer.evaluate(trainer.init(trainer.config.seed))
  baselines = {f'pixels_{k}': pixels[k] for k in ('knn_top1', 'linear_top1')}
  baselines.update({f'init_{k}': init[k] for k in ('knn_top1', 'linear_top1', 'cluster_mi')})
  logging.info('baselines: %s', baselines)
  return baselines


def train_and_evaluate(config, workdir: str) -> dict:
  trainer = Trainer(config, workdir)
  baselines = _baselines(trainer) if config.eval.baselines else {}
  state = trainer.train()
  results = {**trainer.evaluate(state), **baselines}
  write_eval_json(results, os.path.join(workdir, 'eval.json'))
  return results
