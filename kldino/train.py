"""The training loop: the only place with I/O and side effects.

Sections: set-up (config checks, data, mesh, state) -> restore the latest checkpoint or
initialise -> initial prior pass -> epochs of jitted steps, with a prior pass every T epochs and a
checkpoint every N steps -> final checkpoint -> evaluation of the teacher backbone.

A resumed run is the uninterrupted run: the state holds everything that changes (parameters,
optimizer and normalisation state, step, RNG) and the batches of step s are a pure function of
(seed, s). SIGTERM or Ctrl-C (one process) or JAX's preemption sync point (several) saves the step
just taken, waits for the files, and stops (kldino/runtime/signals.py); outside the steps (the
baselines before them, the final evaluation after the last checkpoint) there is nothing to save
and either stops at once.
"""
from __future__ import annotations

import functools
import itertools
import os
import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers

from kldino import checkpoint as checkpoint_lib

from kldino import run as run_lib
from kldino.core import guard as guard_lib
from kldino.core import objective
from kldino.core import prior_pass
from kldino.core import program as program_lib
from kldino.core import sharding
from kldino.data import pipeline
from kldino.errors import CollapseStopped, ConfigError, NonFiniteLoss
from kldino.evaluate import pictures
from kldino.evaluate.evaluators import Evaluators, evaluate, write_eval_json
from kldino.evaluate.pca import patch_pca
from kldino.models import forward
from kldino.models.vit import VIT_SIZES
from kldino.runtime import files
from kldino.runtime import host_memory
from kldino.runtime import signals

# Examples whose crops (first batch), attention maps and PCA (evaluations) TensorBoard shows.
_PICTURES = 4


def check_finite(metrics: list, first_step: int, latest_checkpoint: int | None):
  """NonFiniteLoss naming the first step of `metrics` (host values of steps first_step, ...) whose
  loss or gradient was not finite; the train step kept the state before it."""
  for offset, step_metrics in enumerate(metrics):
    if not step_metrics['finite']:
      kept = (f'the last checkpoint (step {latest_checkpoint}) is intact'
              if latest_checkpoint is not None else 'no checkpoint was written')
      raise NonFiniteLoss(f'non-finite loss or gradient at step {first_step + offset}; {kept}: '
                          'lower optim.lr (or check the data) and rerun')


def _dinov2_terms(averaged: dict) -> str:
  """The console line's part for iBOT, KoLeo and Gram anchoring ('' without them)."""
  terms = ''
  if 'ibot_loss' in averaged:
    terms += (f" | ibot {averaged['ibot_loss']:.4f} patch H {averaged['patch_teacher_entropy']:.3f}"
              f" clusters {averaged['patch_batch_effective_clusters']:.1f}")
  if 'koleo_loss' in averaged:
    terms += f" | koleo {averaged['koleo_loss']:.4f}"
  if 'gram_loss' in averaged:
    terms += f" | gram {averaged['gram_loss']:.4f}"
  return terms


class Trainer:
  """A Run (kldino/run.py) plus what training adds: the program (kldino/core/program.py), the
  evaluators, the collapse guard and the metric writer."""

  def __init__(self, config, workdir: str):
    self.run = run_lib.Run(config, workdir)
    self.run.check_training_order()
    self.config = config
    self.workdir = workdir
    # The steps per epoch read the dataset's size: a bad dataset fails here, early.
    self.program = program_lib.build(config, self.run.graphdef, self.run.in_channels, self.run.mesh,
                                     self.run.steps_per_epoch)
    self.schedules = self.program.schedules
    self.evaluators = Evaluators(self.run)
    self.guard = guard_lib.CollapseGuard(config.guard,
                                         config.model.num_prototypes,
                                         self.schedules.steps_per_epoch,
                                         patches=objective.uses_ibot(config.objective))

  @functools.cached_property
  def train_step(self):
    """The program's train step, compiled ahead of the first batch (its memory is then known)."""
    batch = program_lib.abstract_train_batch(self.config, self.run.in_channels, self.mesh)
    return self.program.train_step.lower(self.program.abstract_state, batch).compile()

  def check_host_memory(self):
    """Refuses, before the first step, a run whose input batches and (on a CPU, whose devices'
    memory is the host's) train step cannot fit the host's memory."""
    parts = {'input batches': pipeline.host_batch_bytes(self.config, jax.process_count())}
    if jax.local_devices()[0].platform == 'cpu':
      memory = self.train_step.memory_analysis()
      per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
                    memory.temp_size_in_bytes - memory.alias_size_in_bytes)
      devices = jax.local_device_count()
      parts[f'the train step on {devices} CPU device{"s" if devices > 1 else ""}'] = (per_device *
                                                                                      devices)
    host_memory.check_fits(
        parts, 'lower batch_size or the crops (aug.global_size, aug.local_size, '
        'aug.num_local), or set model.remat=True')

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
    """The latest readable checkpoint (or `step`), else a fresh state (with init_from or
    gram.ckpt, the parameters of their sources: kldino/checkpoint.py, start_from)."""
    state, meta = self.checkpointer.restore(self.program.abstract_state, self.config, step=step)
    if state is None:
      state = self.program.init(self.config.seed)
      if self.config.init_from or (self.config.gram.use and self.config.gram.ckpt):
        state = checkpoint_lib.start_from(state, self.config, self.run.abstract_params,
                                          self.program.state_shardings, self.mesh)
      return state
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

  # --------------------------------------------------------------------------- prior pass

  def _prior_pass_batches(self):
    local = pipeline.eval_batches(self.source,
                                  self.config.data.train_split,
                                  self.config,
                                  batch_size=self.config.prior_pass_batch_size,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    return (sharding.global_batch(batch, self.mesh) for batch in local)

  def run_prior_pass(self, state, epoch: int):
    """A prior pass before `epoch` (kldino/core/prior_pass.py:measure): its figures to the log
    and TensorBoard, its prior into the state when it is due to set it."""
    result = prior_pass.measure(self.program.prior_pass,
                                state.teacher,
                                self._prior_pass_batches,
                                config=self.config,
                                schedules=self.schedules,
                                mesh=self.mesh,
                                step=int(state.step),
                                unit_prototypes=forward.unit_prototypes(
                                    self.graphdef, state.teacher))
    self.writer.write_scalars(int(state.step), result.scalars)
    self.writer.write_histograms(int(state.step), result.histograms)
    logging.info('%s', prior_pass.describe(result.scalars, epoch))
    objective_config, norm_state = self.config.objective, dict(state.norm_state)
    if prior_pass.update_due(objective_config, epoch):  # else a diagnostic pass: measured only
      norm_state['log_prior'] = result.log_prior
    if result.patch_log_prior is not None and prior_pass.update_due(
        objective_config, epoch, objective_config.patch_normalization):
      norm_state['patch'] = {**norm_state['patch'], 'log_prior': result.patch_log_prior}
    return state.replace(
        norm_state=jax.device_put(norm_state, self.program.state_shardings.norm_state))

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
        'clusters %.1f (prior %.1f)%s | lr %.2e | %.1f img/s | ETA %s', step, total, epoch,
        averaged['loss'], averaged['kl'], averaged['teacher_entropy'], averaged['target_entropy'],
        averaged['batch_effective_clusters'], averaged['prior_effective_clusters'],
        _dinov2_terms(averaged), averaged['lr'], averaged['images_per_sec'],
        time.strftime('%H:%M:%S', time.gmtime(eta)))
    collapse = self.guard.observe(step, averaged)
    if collapse is not None and self.guard.mode == 'warn':  # stop ends with the line itself
      logging.warning('%s', collapse.message())
    return collapse

  def _stop_collapsed(self, state, collapse: guard_lib.Collapse):
    """guard.collapse=stop: the collapsed step's checkpoint, then CollapseStopped."""
    self.save(state, collapse.step, force=True)
    self.checkpointer.wait()
    raise CollapseStopped(
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
      raise CollapseStopped(f'the run stopped collapsed at step {step} (eval.json): '
                            f'{self.guard.collapse.kind.replace("_", "-")} collapse; rerun with '
                            '--config.guard.collapse=warn to train on, or start a new --workdir')

  def train_epoch(self, state, epoch: int, stop: signals.StopRequests, start_step: int = 0):
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
      stop.after_step(
          step, self.checkpointer, lambda: self.save(state, step, force=True),
          f'stopped at step {step} on request; the checkpoint is saved: rerun the same command to '
          'resume')
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
    try:
      with signals.StopRequests('a checkpoint') as stop:
        state = self._epochs(state, start, stop)
    except BaseException:
      self._settle_checkpoints()
      raise
    return state

  def _epochs(self, state, start: int, stop: signals.StopRequests):
    """The epochs from step `start` to the end, and the final checkpoint."""
    config, spe = self.config, self.schedules.steps_per_epoch
    for epoch in range(start // spe, config.num_epochs):
      start_step = start - epoch * spe if epoch == start // spe else 0
      if start_step == 0 and prior_pass.pass_due(config, epoch):
        state = self.run_prior_pass(state, epoch)
      state = self.train_epoch(state, epoch, stop, start_step)
      if epoch + 1 < config.num_epochs:
        periodic = self.evaluate(state.teacher, (epoch + 1) * spe, epochs_done=epoch + 1)
        if periodic:
          logging.info('epoch %d: %s', epoch, periodic)
    final_step = max(start, self.schedules.total_steps)
    if self.checkpointer.latest_step() != final_step:
      self.save(state, final_step, force=True)
    self.checkpointer.wait()
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
                    pictures.to_uint8(view, mean, std)
                    for view in first[key][:_PICTURES].reshape(-1, *first[key].shape[2:])
                ]) for key in ('global_crops', 'local_crops') if first[key].shape[1]
        })
    return itertools.chain([first], batches)

  @functools.cached_property
  def _picture_inputs(self):
    """The evaluation views of the eval split's first _PICTURES images and the jitted (attention,
    patch tokens) of a teacher on them (every process passes the same images: replicated)."""
    views = pipeline.preview_views(self.source,
                                   self.config.data.eval_split,
                                   self.config,
                                   _PICTURES,
                                   crops=False)
    images = np.stack([view['eval'] for view in views])
    replicated = sharding.replicated(self.mesh)
    outputs = jax.jit(lambda teacher, batch: (forward.cls_attention(self.graphdef, teacher, batch),
                                              forward.patch_tokens(self.graphdef, teacher, batch)),
                      in_shardings=(self.program.state_shardings.teacher, replicated),
                      out_shardings=replicated)
    return images, outputs

  def _write_pictures(self, teacher, step: int):
    """The teacher's attention maps and the PCA of its patch tokens (kldino/evaluate/pca.py, one
    PCA over the batch's patches) of a fixed eval batch, drawn as --mode=attention and --mode=pca
    draw them; ViTs only."""
    if self.config.model.name not in VIT_SIZES:
      return
    images, outputs = self._picture_inputs
    maps, tokens = jax.device_get(outputs(teacher, images))
    side = images.shape[1] // self.config.model.patch_size
    mean, std = self.config.data.mean, self.config.data.std
    pixels = [pictures.to_uint8(image, mean, std) for image in images]
    components = patch_pca(np.asarray(tokens), (side, side))
    self.writer.write_images(
        step, {
            'attention/teacher':
                np.stack([
                    np.asarray(pictures.picture(image, image_maps, (side, side)))
                    for image, image_maps in zip(pixels, maps)
                ]),
            'pca/teacher':
                np.stack([
                    np.asarray(pictures.pca_picture(image, image_pca, (side, side)))
                    for image, image_pca in zip(pixels, components)
                ])
        })

  # --------------------------------------------------------------------------- evaluation

  def evaluate(self, teacher, step: int, *, epochs_done: int | None = None) -> dict:
    """The final evaluators (config.evals) on `teacher`, or with `epochs_done` the periodic ones
    due then ({} if none); scalars, the attention maps and the PCA also go to TensorBoard."""
    results = evaluate(self.evaluators,
                       teacher,
                       step,
                       self.run.teacher_temp(step),
                       epochs_done=epochs_done)
    if results:
      self.writer.write_scalars(step, {
          f'eval/{k}': v for k, v in results.items() if isinstance(v, float)
      })
      self._write_pictures(teacher, step)
      self.writer.flush()
    return results


def _baselines(trainer: Trainer) -> dict:
  """The same probes on raw pixels and on the backbone at initialisation, for comparison."""
  pixels = Evaluators(trainer.run, features='pixels', types=('knn', 'feature_probe'))
  baselines = {
      f'pixels_{k}': v
      for k, v in pixels.final(None, 1.0).items()
      if k in ('knn_top1', 'linear_top1')
  }
  init = trainer.evaluate(trainer.program.init(trainer.config.seed).teacher, 0)
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
  trainer.check_host_memory()
  checkpoint_lib.write_config_json(config, workdir)
  with signals.stops_at_once('during the baselines, before training: rerun the same command'):
    baselines = _baselines(trainer) if config.eval.baselines else {}
  try:
    state = trainer.train()
  except CollapseStopped:
    collapse = trainer.guard.collapse
    write_eval_json({'collapse': collapse.record(), 'step': collapse.step, **baselines}, eval_path)
    raise
  collapse = trainer.guard.collapse
  step = int(state.step)
  with signals.stops_at_once(f'during the final evaluation; the checkpoint of step {step} is '
                             'saved: rerun the same command to evaluate it'):
    logging.info('the final evaluation of step %d', step)  # SIGTERM from here on stops at once
    results = {
        **trainer.evaluate(state.teacher, step),
        **baselines, 'collapse': collapse.record() if collapse else None
    }
  write_eval_json(results, eval_path)
  return results
