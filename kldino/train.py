"""The training loop: the only place with I/O and side effects.

Sections: set-up (config checks, data, mesh, state) -> restore the latest checkpoint or
initialise -> initial prior pass -> epochs of jitted steps, with a prior pass every T epochs and a
checkpoint every N steps -> final checkpoint -> evaluation of the teacher backbone.

A resumed run is the uninterrupted run: the state holds everything that changes (parameters,
optimizer and normalisation state, step, RNG) and the batches of step s are a pure function of
(seed, s). SIGTERM (one process) or JAX's preemption sync point (several) saves the step just taken,
waits for the files, and stops with `Preempted`; outside the steps (the baselines before them, the
final evaluation after the last checkpoint) there is nothing to save and SIGTERM stops at once.
"""
from __future__ import annotations

import functools
import itertools
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers

from kldino import attention_maps
from kldino import checkpoint as checkpoint_lib
from kldino import files
from kldino import forward
from kldino import guard as guard_lib
from kldino import objective
from kldino import optim
from kldino import preview
from kldino import run as run_lib
from kldino import sharding
from kldino import step as step_lib
from kldino import prior_pass
from kldino.config_checks import ConfigError
from kldino.data import pipeline
from kldino.evaluate.evaluators import Evaluators
from kldino.models.vit import VIT_SIZES

# Examples whose crops (first batch) and attention maps (evaluations) TensorBoard shows.
_PICTURES = 4


class Collapsed(RuntimeError):
  """Training stopped: the loss is not finite."""


def check_finite(metrics: list, first_step: int, latest_checkpoint: int | None):
  """Collapsed naming the first step of `metrics` (host values of steps first_step, ...) whose
  loss or gradient was not finite; the train step kept the state before it."""
  for offset, step_metrics in enumerate(metrics):
    if not step_metrics['finite']:
      kept = (f'the last checkpoint (step {latest_checkpoint}) is intact'
              if latest_checkpoint is not None else 'no checkpoint was written')
      raise Collapsed(f'non-finite loss or gradient at step {first_step + offset}; {kept}: '
                      'lower optim.lr (or check the data) and rerun')


class Trainer:
  """A Run (kldino/run.py) plus what training adds: the optimizer, the jitted init, train step and
  prior pass, and the metric writer."""

  def __init__(self, config, workdir: str):
    self.run = run_lib.Run(config, workdir)
    self.config = config
    self.workdir = workdir
    self.schedules = self.run.schedules  # reads the dataset's size: fails early on bad data
    self.normalization = self.run.normalization
    optimizer = optim.make_optimizer(config.optim, self.schedules)
    init_fn = step_lib.make_init_fn(config, self.run.in_channels, optimizer)
    self.init, self.state_shardings = step_lib.jit_init(init_fn, self.mesh,
                                                        config.mesh.fsdp_min_size)
    self.train_step = step_lib.jit_train_step(
        step_lib.make_train_step(self.graphdef, config, self.schedules, optimizer),
        self.state_shardings, self.mesh)
    standardise = self.normalization.standardise_teacher_embedding
    self.prior_accumulate, self.gap_accumulate, self.drift_accumulate = prior_pass.jit_pass_fns(
        self.graphdef, standardise, self.state_shardings.teacher, self.mesh)
    self.evaluators = Evaluators(self.run)
    self.guard = guard_lib.CollapseGuard(config.guard, config.model.num_prototypes,
                                         self.schedules.steps_per_epoch)
    self.abstract_state = jax.tree.map(
        lambda leaf, leaf_sharding:
        jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf_sharding),
        jax.eval_shape(init_fn, 0), self.state_shardings)

  # The Run's parts, under the names the loop uses.
  source = property(lambda self: self.run.source)
  mesh = property(lambda self: self.run.mesh)
  graphdef = property(lambda self: self.run.graphdef)
  checkpointer = property(lambda self: self.run.checkpointer)
  data_shards = property(lambda self: self.run.data_shards)

  @functools.cached_property
  def writer(self):
    """TensorBoard on process 0; the full dictionaries on the console too with --verbosity=1
    (the console's own line per log step is _log's). Created when first used, so that reading a
    checkpoint leaves no event file behind. Synchronous: a failed write (a full disk) is raised
    here, in the loop, not logged from a writer thread."""
    writers = [metric_writers.SummaryWriter(self.workdir)] if jax.process_index() == 0 else []
    if logging.get_verbosity() >= 1:
      writers.append(metric_writers.LoggingWriter())
    return metric_writers.MultiWriter(writers)

  # --------------------------------------------------------------------------- checkpoints

  def restore_or_init(self, step: int | None = None):
    """The latest readable checkpoint (or `step`), else a fresh state."""
    state, meta = self.checkpointer.restore(self.abstract_state, self.config, step=step)
    if state is None:
      return self.init(self.config.seed)
    step = int(state.step)
    # An imported checkpoint (step 0, written without reading a dataset) records no epoch size.
    if meta['steps_per_epoch'] not in (None, self.schedules.steps_per_epoch):
      raise ConfigError(
          f"the checkpoint at step {step} has {meta['steps_per_epoch']} steps per epoch and this "
          f'run {self.schedules.steps_per_epoch} (the dataset changed): use a new --workdir')
    if meta['data_shards'] != self.data_shards:
      raise ConfigError(
          f"the checkpoint at step {step} read the data in {meta['data_shards']} shards and this "
          f'run would read {self.data_shards}: set --config.data.shards={meta["data_shards"]} '
          'to resume on this number of processes')
    logging.info('resuming from the checkpoint at step %d (epoch %d, step %d of the epoch)', step,
                 meta['epoch'], meta['step_in_epoch'])
    return state

  def save(self, state, step: int, *, force: bool = False):
    meta = checkpoint_lib.position_meta(self.config, step, self.schedules.steps_per_epoch,
                                        self.data_shards)
    self.checkpointer.save(step, state, meta, force=force)

  def _settle_checkpoints(self):
    """On the way out of a failed run: the asynchronous save in flight ends (committed, or
    failed and reported by the error already raised) before the process does."""
    try:
      self.checkpointer.wait()
    except checkpoint_lib.WriteFailed:
      pass

  def _stop_requested(self, step: int) -> bool:
    # Several processes must stop at the same step: JAX's preemption sync point agrees on one.
    return self._sigterm_received or self.checkpointer.reached_preemption(step)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint after the current step')
    self._sigterm_received = True

  # --------------------------------------------------------------------------- prior pass

  def _prior_pass_batches(self):
    return pipeline.eval_batches(self.source,
                                 self.config.data.train_split,
                                 self.config,
                                 batch_size=self.config.prior_pass_batch_size,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())

  def run_prior_pass(self, state, epoch: int):
    """Re-estimate Q(k) with the current teacher over the whole training set (eq. 15), at the
    mean teacher temperature of the steps it will serve (kldino/prior_pass.py:period_temperatures),
    then measure the Jensen gap with it (over `objective.gap_examples` examples, 0: all) and,
    during a temperature warm-up, how far the targets drift from those of the exact prior."""
    # The last train steps may still be queued: wait for them, or the pass's time includes them.
    jax.block_until_ready(state.teacher)
    start = time.time()
    step = int(state.step)
    period_end = min(
        step + self.config.objective.prior_every_epochs * self.schedules.steps_per_epoch,
        self.schedules.total_steps)
    temps = prior_pass.period_temperatures(self.schedules.teacher_temp, step, period_end)
    replicated = sharding.replicated(self.mesh)  # as the jitted outputs: one compile, not two
    sums = jax.device_put(prior_pass.init_sums(self.config.model.num_prototypes, len(temps)),
                          replicated)
    for batch in self._prior_pass_batches():
      sums = self.prior_accumulate(sums, state.teacher, sharding.global_batch(batch, self.mesh),
                                   temps)
    eps = self.config.objective.prior_eps
    summary = prior_pass.summarise(sums, eps)
    gap_sums = jax.device_put(prior_pass.init_gap_sums(), replicated)
    drift_sums = jax.device_put(prior_pass.init_drift_sums(), replicated)
    log_priors = jnp.stack(
        [prior_pass.summarise(sums, eps, row)['log_prior'] for row in range(len(temps))])
    gap_examples = self.config.objective.gap_examples
    gap_batches = -(-gap_examples // self.config.prior_pass_batch_size) if gap_examples else None
    for batch in itertools.islice(self._prior_pass_batches(), gap_batches):
      batch = sharding.global_batch(batch, self.mesh)
      gap_sums = self.gap_accumulate(gap_sums, state.teacher, batch, temps[0], summary['log_prior'],
                                     summary['mean_logits'])
      if len(temps) > 1:
        drift_sums = self.drift_accumulate(drift_sums, state.teacher, batch, temps, log_priors)
    # The head's own unit prototypes, so that the 'centered' mode is measured as it is used.
    unit = forward.unit_prototypes(self.graphdef, state.teacher)
    drift_count = jnp.maximum(drift_sums['count'], 1.0)
    pass_metrics = {
        'prior_pass/effective_clusters':
            summary['effective_clusters'],
        'prior_pass/prior_entropy':
            summary['prior_entropy'],
        'prior_pass/empty_cluster_fraction':
            summary['empty_cluster_fraction'],
        'prior_pass/jensen_gap':
            gap_sums['gap_sum'] / gap_sums['count'],
        'prior_pass/prototype_mean_norm':
            jnp.linalg.norm(jnp.mean(unit, axis=1)),
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
    pass_metrics = {k: float(v) for k, v in jax.device_get(pass_metrics).items()}
    pass_metrics['prior_pass/seconds'] = time.time() - start  # after device_get: the real duration
    self.writer.write_scalars(step, pass_metrics)
    self.writer.write_histograms(
        step, {
            'prior_pass/prior': np.exp(np.asarray(jax.device_get(summary['log_prior']))),
            'prior_pass/prototype_usage': np.asarray(jax.device_get(sums['assignments']))
        })
    logging.info(
        'prior pass before epoch %d: %d examples, effective clusters %.1f, '
        'empty %.1f%%, Jensen gap %.4f, tau_t %.4f (drift %.2e), %.1fs', epoch,
        pass_metrics['prior_pass/examples'], pass_metrics['prior_pass/effective_clusters'],
        100 * pass_metrics['prior_pass/empty_cluster_fraction'],
        pass_metrics['prior_pass/jensen_gap'], pass_metrics['prior_pass/teacher_temp'],
        pass_metrics['prior_pass/prior_temp_drift'], pass_metrics['prior_pass/seconds'])
    if not self._prior_update_due(epoch):  # a diagnostic pass: measured, not used
      return state
    norm_state = {**state.norm_state, 'log_prior': summary['log_prior']}
    return state.replace(norm_state=jax.device_put(norm_state, self.state_shardings.norm_state))

  def _prior_update_due(self, epoch: int) -> bool:
    objective_config = self.config.objective
    if not objective.uses_prior_pass(objective_config):
      return False
    if epoch == 0:
      return objective_config.prior_init == 'sweep'
    # The EMA source only takes its initial value from a pass; `sweep` re-estimates every T.
    return (objective_config.prior_source == 'sweep' and
            epoch % objective_config.prior_every_epochs == 0)

  def _prior_pass_due(self, epoch: int) -> bool:
    """A pass sets the prior, or (eval.prior_pass_diagnostics) only measures the teacher's cluster
    statistics every T epochs, for any normalisation: the study compares them all."""
    diagnostic = (self.config.eval.prior_pass_diagnostics and
                  epoch % self.config.objective.prior_every_epochs == 0)
    return self._prior_update_due(epoch) or diagnostic

  # --------------------------------------------------------------------------- epochs

  def _log(self, step: int, metrics: list, images: int, seconds: float,
           epoch: int) -> guard_lib.Collapse | None:
    """The console's line and TensorBoard's scalars of the steps since the last log; the collapse
    the guard establishes with them, if any."""
    check_finite(metrics, step - len(metrics) + 1, self.checkpointer.latest_step())
    averaged = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
    averaged['images_per_sec'] = images / max(seconds, 1e-9)
    averaged['epoch'] = epoch
    self.writer.write_scalars(step, averaged)
    total = self.schedules.total_steps
    elapsed = time.time() - self._train_start  # includes the prior passes, unlike the window
    eta = (total - step) * elapsed / max(step - self._first_step, 1)
    logging.info(
        'step %d/%d epoch %d | loss %.4f kl %.4f | teacher H %.3f target H %.3f | '
        'clusters %.1f (prior %.1f) | lr %.2e | %.1f img/s | ETA %s', step, total, epoch,
        averaged['loss'], averaged['kl'], averaged['teacher_entropy'], averaged['target_entropy'],
        averaged['batch_effective_clusters'], averaged['prior_effective_clusters'], averaged['lr'],
        averaged['images_per_sec'], time.strftime('%H:%M:%S', time.gmtime(eta)))
    collapse = self.guard.observe(step, averaged)
    if collapse is not None and self.guard.mode == 'warn':  # stop ends with the line itself
      logging.warning('%s', collapse.message())
    return collapse

  def _stop_collapsed(self, state, collapse: guard_lib.Collapse):
    """guard.collapse=stop: the collapsed step's checkpoint, then CollapseStopped."""
    self.save(state, collapse.step, force=True)
    self.checkpointer.wait()
    raise guard_lib.CollapseStopped(
        f'{collapse.message()}; stopped (guard.collapse=stop) with the checkpoint of step '
        f'{collapse.step} saved: rerun with --config.guard.collapse=warn to train on')

  def _restore_collapse(self, step: int):
    """A collapse recorded in the workdir's eval.json before `step` is this run's too; a run that
    stopped at it does not train on while guard.collapse=stop."""
    try:
      recorded = files.read_json(os.path.join(self.workdir, 'eval.json')).get('collapse')
    except (OSError, ValueError, AttributeError):
      return
    try:
      collapse = guard_lib.Collapse(**recorded) if recorded else None
    except TypeError:  # not a record of this version's guard
      return
    if collapse is None or collapse.step > step:
      return
    self.guard.collapse = collapse
    if self.guard.mode == 'stop' and recorded['step'] == step:
      raise guard_lib.CollapseStopped(
          f'the run stopped collapsed at step {step} (eval.json): '
          f'{self.guard.collapse.kind.replace("_", "-")} collapse; rerun with '
          '--config.guard.collapse=warn to train on, or start a new --workdir')

  def train_epoch(self, state, epoch: int, start_step: int = 0):
    """Steps [start_step, steps_per_epoch) of an epoch, saving checkpoints on the way."""
    config = self.config
    pending, images, window_start = [], 0, time.time()
    batches = pipeline.train_batches(self.source,
                                     config,
                                     epoch=epoch,
                                     start_step=start_step,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
    first_step = epoch * self.schedules.steps_per_epoch + start_step
    if first_step == self._first_step:  # this process's first batch: show its crops
      batches = self._showing_crops(batches, first_step + 1)
    # The step is counted on the host: reading state.step would wait for the device every step.
    for step, batch in enumerate(sharding.prefetch_global_batches(batches, self.mesh),
                                 start=first_step + 1):
      state, metrics = self.train_step(state, batch)
      pending.append(metrics)
      images += config.batch_size
      if step % config.log_every_steps == 0 or step == self.schedules.total_steps:
        pending = jax.device_get(pending)  # waits for the dispatched steps before timing them
        collapse = self._log(step, pending, images, time.time() - window_start, epoch)
        pending, images, window_start = [], 0, time.time()
        if collapse is not None and self.guard.mode == 'stop':
          self._stop_collapsed(state, collapse)
      if self._stop_requested(step):
        self.save(state, step, force=True)
        self.checkpointer.wait()
        raise checkpoint_lib.Preempted(f'stopped at step {step} on request; the checkpoint is '
                                       'saved: rerun the same command to resume')
      if self.checkpointer.should_save(step):
        pending = jax.device_get(pending)  # a checkpoint only of finite states
        check_finite(pending, step - len(pending) + 1, self.checkpointer.latest_step())
        self.save(state, step)  # asynchronous: the files are written while training goes on
    if pending:  # the epoch's steps after its last log
      pending = jax.device_get(pending)
      check_finite(pending, step - len(pending) + 1, self.checkpointer.latest_step())
    return state

  def train(self):
    config = self.config
    spe = self.schedules.steps_per_epoch
    state = self.restore_or_init()
    start = int(state.step)
    self._restore_collapse(start)
    self._train_start, self._first_step = time.time(), start
    logging.info('%d parameters in the student; %d steps per epoch, %d epochs, %d devices',
                 sum(x.size for x in jax.tree.leaves(state.student)), spe, config.num_epochs,
                 jax.device_count())
    self._sigterm_received = False
    # One process: SIGTERM is ours. Several: JAX's preemption service receives it and the sync
    # point (reached_preemption) makes every process stop at the same step.
    previous_handler = (signal.signal(signal.SIGTERM, self._on_sigterm)
                        if jax.process_count() == 1 else None)
    try:
      for epoch in range(start // spe, config.num_epochs):
        start_step = start - epoch * spe if epoch == start // spe else 0
        if start_step == 0 and self._prior_pass_due(epoch):
          state = self.run_prior_pass(state, epoch)
        state = self.train_epoch(state, epoch, start_step)
        if epoch + 1 < config.num_epochs:
          periodic = self.evaluate(state.teacher, (epoch + 1) * spe, epochs_done=epoch + 1)
          if periodic:
            logging.info('epoch %d: %s', epoch, periodic)
      final_step = max(start, self.schedules.total_steps)
      if self.checkpointer.latest_step() != final_step:
        self.save(state, final_step, force=True)
      self.checkpointer.wait()
    except BaseException:
      self._settle_checkpoints()
      raise
    finally:
      if previous_handler is not None:
        signal.signal(signal.SIGTERM, previous_handler)
    return state

  # --------------------------------------------------------------------------- pictures

  def _showing_crops(self, batches, step: int):
    """`batches`, the first one's augmented crops of _PICTURES examples sent to TensorBoard."""
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
      return batches
    mean, std = self.config.data.mean, self.config.data.std
    self.writer.write_images(
        step, {
            f'input/{key}':
                np.stack([
                    preview.to_uint8(view, mean, std)
                    for view in first[key][:_PICTURES].reshape(-1, *first[key].shape[2:])
                ]) for key in ('global_crops', 'local_crops') if first[key].shape[1]
        })
    return itertools.chain([first], batches)

  @functools.cached_property
  def _attention_inputs(self):
    """The evaluation views of the eval split's first _PICTURES images and the jitted attention
    of a teacher on them (every process passes the same images: replicated)."""
    views = pipeline.preview_views(self.source,
                                   self.config.data.eval_split,
                                   self.config,
                                   _PICTURES,
                                   crops=False)
    images = np.stack([view['eval'] for view in views])
    replicated = sharding.replicated(self.mesh)
    attention = jax.jit(lambda teacher, batch: forward.cls_attention(self.graphdef, teacher, batch),
                        in_shardings=(self.state_shardings.teacher, replicated),
                        out_shardings=replicated)
    return images, attention

  def _write_attention(self, teacher, step: int):
    """The teacher's attention maps of a fixed eval batch (kldino/attention_maps.py), ViTs only."""
    if self.config.model.name not in VIT_SIZES:
      return
    images, attention = self._attention_inputs
    maps = np.asarray(jax.device_get(attention(teacher, images)))
    side = images.shape[1] // self.config.model.patch_size
    mean, std = self.config.data.mean, self.config.data.std
    pictures = [
        np.asarray(
            attention_maps.picture(preview.to_uint8(image, mean, std), image_maps, (side, side)))
        for image, image_maps in zip(images, maps)
    ]
    self.writer.write_images(step, {'attention/teacher': np.stack(pictures)})

  # --------------------------------------------------------------------------- evaluation

  def evaluate(self, teacher, step: int, *, epochs_done: int | None = None) -> dict:
    """The final evaluators (config.evals) on `teacher`, or with `epochs_done` the periodic ones
    due then ({} if none); scalars and the attention maps also go to TensorBoard."""
    results = evaluate(self.evaluators,
                       teacher,
                       step,
                       self.run.teacher_temp(step),
                       epochs_done=epochs_done)
    if results:
      self.writer.write_scalars(step, {
          f'eval/{k}': v for k, v in results.items() if isinstance(v, float)
      })
      self._write_attention(teacher, step)
      self.writer.flush()
    return results


def evaluate(evaluators: Evaluators,
             params,
             step: int,
             teacher_temp: float,
             *,
             epochs_done: int | None = None) -> dict:
  """The evaluation JSON of `params` at `step`: the evaluators' fields, the step and tau_t."""
  if epochs_done is None:
    results = evaluators.final(params, teacher_temp)
  else:
    results = evaluators.periodic(params, teacher_temp, epochs_done)
  if results:
    results.update(step=int(step), teacher_temp=teacher_temp)
  return results


def write_eval_json(results: dict, path: str):
  if jax.process_index() == 0:
    files.write_json(path, results)


def _baselines(trainer: Trainer) -> dict:
  """The same probes on raw pixels and on the backbone at initialisation, for comparison."""
  pixels = Evaluators(trainer.run, features='pixels', types=('knn', 'feature_probe'))
  baselines = {
      f'pixels_{k}': v
      for k, v in pixels.final(None, 1.0).items()
      if k in ('knn_top1', 'linear_top1')
  }
  init = trainer.evaluate(trainer.init(trainer.config.seed).teacher, 0)
  baselines.update(
      {f'init_{k}': init[k] for k in ('knn_top1', 'linear_top1', 'cluster_mi') if k in init})
  logging.info('baselines: %s', baselines)
  return baselines


def _finished_results(trainer: Trainer, eval_path: str) -> dict | None:
  """The evaluation of a run that already ended in this workdir (its final checkpoint, and an
  eval.json of that step), or None. Run again, such a run repeats nothing: a sweep that resumes
  spends no time on its finished jobs and logs no second final evaluation."""
  total = trainer.schedules.total_steps
  if trainer.checkpointer.latest_step() != total:
    return None
  try:
    results = files.read_json(eval_path)
  except (FileNotFoundError, ValueError):
    return None  # never written, or cut short: evaluate again
  if results.get('step') != total or 'collapse' not in results:
    return None  # written by --mode=eval, or by the collapse guard
  # Restoring refuses a config the checkpoint does not fit, as resuming does.
  return results if int(trainer.restore_or_init().step) == total else None


def train_and_evaluate(config, workdir: str) -> dict:
  trainer = Trainer(config, workdir)
  eval_path = os.path.join(workdir, 'eval.json')
  if (results := _finished_results(trainer, eval_path)) is not None:
    logging.info('the run already ended at step %d: its evaluation is %s', results['step'],
                 eval_path)
    return results
  checkpoint_lib.write_config_json(config, workdir)
  with checkpoint_lib.sigterm_stops_at_once(
      'during the baselines, before training: rerun the same command'):
    baselines = _baselines(trainer) if config.eval.baselines else {}
  try:
    state = trainer.train()
  except guard_lib.CollapseStopped:
    collapse = trainer.guard.collapse
    write_eval_json({'collapse': collapse.record(), 'step': collapse.step, **baselines}, eval_path)
    raise
  collapse = trainer.guard.collapse
  step = int(state.step)
  with checkpoint_lib.sigterm_stops_at_once(
      f'during the final evaluation; the checkpoint of step {step} is '
      'saved: rerun the same command to evaluate it'):
    logging.info('the final evaluation of step %d', step)  # SIGTERM from here on stops at once
    results = {
        **trainer.evaluate(state.teacher, step),
        **baselines, 'collapse': collapse.record() if collapse else None
    }
  write_eval_json(results, eval_path)
  return results
