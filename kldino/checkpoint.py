"""Checkpoints that lose nothing: the whole train state, where the data stood, and the config.

One orbax step directory per checkpoint: WORKDIR/checkpoints/<step>/state (the TrainState) and
.../meta (JSON: the config, epoch, step_in_epoch, steps_per_epoch, data_shards, format). A save
commits by renaming, so a crash leaves no step behind; a committed step that cannot be read is
moved to WORKDIR/checkpoints_unreadable/ and the previous one used; a checkpoint whose
architecture or data position does not fit the config (read through its upgrades,
kldino/config/workdir.py) is refused before anything is read. The data are a pure function of
(seed, epoch, step in epoch), so the step is the data position; `meta` records it so that a
changed batch size or dataset is caught. docs/checkpoints.md says what is checked.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from kldino.runtime import files
from kldino.config.workdir import flat_dict, resume_refusal, upgrade
from kldino.core import gram as gram_lib
from kldino.core import sharding
from kldino.errors import ConfigError, WriteFailed
from kldino.models.vit import resize_position_table

FORMAT = 1
# Keys that fix the parameters' shapes: a checkpoint written with other values cannot be loaded.
ARCHITECTURE_KEYS = ('model', 'aug.global_size', 'objective.ibot.separate_head')
# Keys that place the data: with other values the saved data position means something else.
DATA_POSITION_KEYS = ('seed', 'batch_size', 'data.name', 'data.path', 'data.train_split',
                      'data.shuffle')
# Keys that decide what the train state holds beyond the parameters (a Gram teacher).
STATE_KEYS = ('gram.use',)


def directory(workdir: str) -> str:
  return os.path.join(files.absolute(workdir), 'checkpoints')


def _selected(flat: dict, prefixes) -> dict:
  return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + '.') for p in prefixes)}


def _leaf_shapes(tree) -> dict:
  # Orbax's metadata of a scalar may carry no shape: read it as ().
  return {
      jax.tree_util.keystr(path, simple=True, separator='/'): tuple(leaf.shape or ())
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def check_compatible(saved_config: dict,
                     config,
                     step: int,
                     where: str,
                     *,
                     for_training: bool = True):
  """Refuse a checkpoint whose parameters (or, to train on, data position) differ from what
  `config` builds. Evaluation may use any dataset; training must continue on the same batches."""
  refusal = resume_refusal(saved_config) if for_training else None
  if refusal:
    raise ConfigError(f'the checkpoint at step {step} in {where} cannot be resumed: {refusal}')
  saved, current = flat_dict(upgrade(saved_config).to_dict()), flat_dict(config.to_dict())
  checks = [(ARCHITECTURE_KEYS, 'its parameters have other shapes')]
  if for_training:
    checks.append((DATA_POSITION_KEYS, 'its data position means other batches'))
    checks.append((STATE_KEYS, 'its train state holds a Gram teacher only with gram.use=True '
                   '(to add Gram anchoring to a run, start one with --config.init_from=WORKDIR)'))
  for prefixes, problem in checks:
    old, new = _selected(saved, prefixes), _selected(current, prefixes)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
      differences = ', '.join(f'{k}={old.get(k)!r} (now {new.get(k)!r})' for k in changed[:4])
      raise ConfigError(
          f'the checkpoint at step {step} in {where} was written with {differences}, so '
          f'{problem}: use the same values or a new --workdir')
  changed = sorted(k for k in saved.keys() & current.keys() if saved[k] != current[k])
  if changed and for_training:
    logging.warning(
        'resuming step %d with changed config keys (the run will differ from an '
        'uninterrupted one): %s', step, ', '.join(changed))


class Checkpointer:
  """An orbax CheckpointManager with kldino's layout, fallback and compatibility checks."""

  def __init__(self, workdir: str, *, every_steps: int, keep: int, read_only: bool = False):
    self.directory = directory(workdir)
    if read_only and not os.path.isdir(self.directory):
      raise ConfigError(f'no checkpoints in {workdir} ({self.directory} does not exist): '
                        'train first or pass the --workdir of a training run')
    options = ocp.CheckpointManagerOptions(save_interval_steps=max(1, every_steps),
                                           max_to_keep=keep,
                                           create=not read_only,
                                           read_only=read_only,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
    # Handlers named up front: a fresh process can then read metadata before any restore.
    self.manager = ocp.CheckpointManager(self.directory,
                                         options=options,
                                         item_handlers={
                                             'state': ocp.PyTreeCheckpointHandler(),
                                             'meta': ocp.JsonCheckpointHandler()
                                         })

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Asynchronous: returns once the arrays are copied off the devices (the state may then be
    donated); `wait()` waits for the files. WriteFailed when this or the previous save failed."""
    with self._writing():
      return self.manager.save(step,
                               args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                       meta=ocp.args.JsonSave({
                                                           **meta, 'format': FORMAT
                                                       })),
                               force=force)

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """JAX's preemption sync point (TPU VMs): every process agrees on the same step."""
    return self.manager.reached_preemption(step)

  def wait(self):
    """Until the asynchronous save in flight is committed; WriteFailed if it failed."""
    with self._writing():
      self.manager.wait_until_finished()

  @contextlib.contextmanager
  def _writing(self):
    """Orbax reports a failed write (from its threads) at the next save or wait, as any of
    several exception types: one WriteFailed names it and what is left."""
    try:
      yield
    except Exception as error:  # pylint: disable=broad-except
      cause = _short_cause(error)
      with contextlib.suppress(Exception):  # the steps on disk, without the failed one
        self.manager.reload()
      latest = self.latest_step()
      kept = (f'the newest committed checkpoint, step {latest}, is intact: free space (or fix '
              'the mount) and rerun the same command to resume from it' if latest is not None else
              'no checkpoint was committed yet, so there is nothing to resume: free space for at '
              'least two checkpoints (or fix the mount) and rerun the same command')
      raise WriteFailed(
          f'writing a checkpoint in {self.directory} failed ({cause}); {kept}') from error

  def saved_shapes(self, step: int) -> dict:
    """{'student/backbone/pos_embed': shape, ...} of every array of the checkpoint's state."""
    return _leaf_shapes(self.manager.item_metadata(step)['state'])

  def _check_shapes(self, step: int, abstract_state, *, exact: bool = False):
    """Every array this run builds must be in the checkpoint with the same shape; `exact`: and
    the checkpoint must hold no other."""
    saved = self.saved_shapes(step)
    built = _leaf_shapes(abstract_state)
    for path, shape in built.items():
      if saved.get(path) != shape:
        raise ConfigError(
            f'the checkpoint at step {step} in {self.directory} holds {path} with shape '
            f'{saved.get(path)} where this config builds {shape}: use the config it was trained '
            'with (data channels, model, crop size) or a new --workdir')
    extra = sorted(saved.keys() - built.keys()) if exact else []
    if extra:
      raise ConfigError(f'the checkpoint at step {step} in {self.directory} holds {extra[0]}, '
                        'which this config does not build: use the config it was trained with '
                        'or a new --workdir')

  def _restore_step(self, step: int, abstract_tree, config, *, for_training: bool):
    """(state, meta) for training; for evaluation `abstract_tree` is the teacher's parameters
    alone and only they are read (no optimizer state, no student)."""
    meta = self.meta(step)
    check_compatible(meta['config'], config, step, self.directory, for_training=for_training)
    if for_training:
      # Exact, but read as a partial tree: a state without a Gram teacher (None, no arrays) reads
      # the checkpoints written before the field existed.
      self._check_shapes(step, abstract_tree, exact=True)
      return self.read(step, abstract_tree), meta
    self._check_shapes(step, {'teacher': abstract_tree})
    return self.read(step, {'teacher': abstract_tree})['teacher'], meta

  def read(self, step: int, abstract_tree):
    """The arrays of `abstract_tree` (part of the state: {'teacher': ...}, ...) of a step, placed
    directly into its shardings (this run's mesh); no checks."""
    return self.manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract_tree,
            partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_tree))))['state']

  def _restore_newest(self, abstract_tree, config, step, for_training: bool):
    """(tree, meta, step) of `step`, or of the newest readable step; (None, None, None)."""
    if step is not None:
      if step not in self.all_steps():
        raise ConfigError(f'no checkpoint at step {step} in {self.directory}: its steps are '
                          f'{self.all_steps()}')
      return (*self._restore_step(step, abstract_tree, config, for_training=for_training), step)
    for candidate in reversed(self.all_steps()):
      try:
        return (*self._restore_step(candidate, abstract_tree, config, for_training=for_training),
                candidate)
      except ConfigError:
        raise
      except Exception as error:  # pylint: disable=broad-except
        # Any read failure of one step (orbax, tensorstore, JSON) means that step is unusable.
        logging.warning(
            'checkpoint at step %d is unreadable (%s: %s); falling back to the '
            'previous one', candidate,
            type(error).__name__,
            str(error).splitlines()[0][:200] if str(error) else '')
        self._set_aside(candidate)
    return None, None, None

  def restore(self, abstract_state: Any, config, *, step: int | None = None):
    """(state, meta) of `step`, or of the newest readable step; (None, None) when there is none.

    `abstract_state` holds jax.ShapeDtypeStruct leaves with the shardings of *this* run's mesh,
    so a checkpoint written on 8 devices restores onto 1 (or onto another FSDP layout).
    """
    state, meta, _ = self._restore_newest(abstract_state, config, step, for_training=True)
    return state, meta

  def restore_teacher(self, abstract_teacher: Any, config, *, step: int | None = None):
    """(teacher parameters, step) as `restore`, reading only the teacher, whose abstract
    parameters (with this run's shardings) are `abstract_teacher`; (None, None) if none."""
    teacher, _, step = self._restore_newest(abstract_teacher, config, step, for_training=False)
    return teacher, step

  def _set_aside(self, step: int):
    """Move an unreadable step out of orbax's sight (kept for inspection, never deleted): the
    resumed run will write that step number again."""
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), 'checkpoints_unreadable')
      os.makedirs(aside, exist_ok=True)
      target = os.path.join(aside, str(step))
      if os.path.exists(target):
        shutil.rmtree(target)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'kldino_set_aside_{step}')
    self.manager.reload()


def _short_cause(error: Exception) -> str:
  """The OS error that orbax's (long, nested) message ends in, else its first line, cut short."""
  message = str(error).splitlines()[0] if str(error) else type(error).__name__
  for os_error in ('No space left on device', 'Disk quota exceeded', 'Read-only file system',
                   'Permission denied'):
    if os_error in message:
      return os_error
  return message[:200]


def position_meta(config, step: int, steps_per_epoch: int | None, data_shards: int) -> dict:
  """A checkpoint's `meta`: the config and where the data stood. `steps_per_epoch` is None for
  a step-0 checkpoint written without reading the dataset (an import)."""
  epoch, step_in_epoch = divmod(step, steps_per_epoch) if steps_per_epoch else (0, step)
  return {
      'config': config.to_dict(),
      'epoch': epoch,
      'step_in_epoch': step_in_epoch,
      'steps_per_epoch': steps_per_epoch,
      'data_shards': data_shards
  }


def parse_source(spec: str) -> tuple[str, int | None]:
  """(workdir, step or None: its newest) of 'WORKDIR[:STEP]' (init_from, gram.ckpt)."""
  workdir, colon, step = spec.rpartition(':')
  if colon and step.isdigit() and workdir:
    return workdir, int(step)
  return spec, None


def write_config_json(config, workdir: str):
  """WORKDIR/config.json: the run's config, for people (checkpoints hold their own copy)."""
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, 'config.json'), config.to_dict(), default=list)


# ----------------------------------------------------------------------------- init_from
# A run that starts from another run's checkpoint (`init_from`), and a Gram teacher read from one
# (`gram.ckpt`): DINOv3's later phases (its high-resolution adaptation starts from the pretrained
# weights with a new optimizer and schedules; dinov3/train/ssl_meta_arch.py:init_weights).
#
# `start_from` takes a freshly initialised train state (step 0, a new optimizer and normalisation
# state) and puts in the source's student and teacher, and with Gram anchoring its Gram teacher
# (its teacher's backbone when it holds none); `gram.ckpt` then sets the Gram teacher to that
# checkpoint's teacher backbone. The model must be the same (its parameters' shapes); a learned
# position table of another grid (another aug.global_size) is resized once here, as the ViT
# resizes it for another grid at run time (model.pos_interpolation), so that the network computes
# at the new size exactly what the source computed there. Only a fresh run reads its source: a run
# with checkpoints of its own resumes from them.

_POSITION_TABLE = 'pos_embed'  # a ViT backbone's learned table (the Gram teacher's too)


def _is_position_table(name: str) -> bool:
  return name.rpartition('/')[2] == _POSITION_TABLE


def _open(spec: str, key: str) -> tuple[Checkpointer, int]:
  """The source's checkpointer and step (its newest when the spec names none)."""
  workdir, step = parse_source(spec)
  try:
    checkpointer = Checkpointer(workdir, every_steps=1, keep=1, read_only=True)
  except ConfigError as error:
    raise ConfigError(f'{key}={spec!r}: {error}') from None
  steps = checkpointer.all_steps()
  step = steps[-1] if step is None and steps else step
  if step not in steps:
    raise ConfigError(f'{key}={spec!r}: no checkpoint at step {step} in {checkpointer.directory} '
                      f'(its steps: {steps}); pass WORKDIR or WORKDIR:STEP of a training run')
  return checkpointer, step


def _source_shapes(abstract_tree, saved: dict, key: str, spec: str, step: int):
  """`abstract_tree` ({'teacher': params, ...}) with the shapes the source saved: only a position
  table may differ (in its number of positions); anything else is another model, refused."""

  def source_leaf(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    shape = saved.get(name)
    table = _is_position_table(name) and shape is not None and len(shape) == 3
    if shape != leaf.shape and not (table and
                                    (shape[0], shape[2]) == (leaf.shape[0], leaf.shape[2])):
      raise ConfigError(
          f'{key}={spec!r}: its checkpoint at step {step} holds {name} with shape {shape} where '
          f'this config builds {leaf.shape}, another model: use the model.* of the run it '
          'continues (only aug.global_size may change)')
    return jax.ShapeDtypeStruct(shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(source_leaf, abstract_tree)


def _read(spec: str, key: str, abstract_tree, config, mesh) -> dict:
  """The arrays of `abstract_tree` ({'student': ..., 'teacher': ..., 'gram_teacher': ...}, this
  run's abstract parameters) from the source named by `spec`, position tables resized to this
  run's grid."""
  checkpointer, step = _open(spec, key)
  source_config = upgrade(checkpointer.meta(step)['config'])
  if source_config.model.name != config.model.name:
    raise ConfigError(f'{key}={spec!r}: its checkpoint is a {source_config.model.name} and this '
                      f'config builds a {config.model.name}: use the model.* of the run it '
                      'continues (only aug.global_size may change)')
  shapes = _source_shapes(abstract_tree, checkpointer.saved_shapes(step), key, spec, step)
  shardings = sharding.state_shardings(shapes, mesh, config.mesh.fsdp_min_size)
  trees = checkpointer.read(
      step,
      jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                   shapes, shardings))
  logging.info('%s: read step %d of %s', key, step, checkpointer.directory)
  model = config.model
  grid = config.aug.global_size // model.patch_size if model.name.startswith('vit') else 0

  def resized(path, leaf):
    if not _is_position_table(jax.tree_util.keystr(path, simple=True, separator='/')):
      return leaf
    return resize_position_table(leaf, (grid, grid),
                                 interpolation=model.pos_interpolation,
                                 offset=model.interpolate_offset,
                                 antialias=model.interpolate_antialias)

  return jax.tree_util.tree_map_with_path(resized, trees)


def _has_gram_teacher(spec: str) -> bool:
  checkpointer, step = _open(spec, 'init_from')
  return any(name.startswith('gram_teacher/') for name in checkpointer.saved_shapes(step))


def start_from(state, config, abstract_params, shardings, mesh):
  """`state` (freshly initialised) with the parameters of init_from's and gram.ckpt's sources
  (module docstring), placed in the state's `shardings`."""
  gram = gram_lib.used(config)
  updates = {}
  if config.init_from:
    wanted = {'student': abstract_params, 'teacher': abstract_params}
    gram_from_source = gram and _has_gram_teacher(config.init_from)
    if gram_from_source:
      wanted['gram_teacher'] = abstract_params['backbone']
    updates = _read(config.init_from, 'init_from', wanted, config, mesh)
    if gram and not gram_from_source:
      updates['gram_teacher'] = updates['teacher']['backbone']
  if gram and config.gram.ckpt:
    teacher = _read(config.gram.ckpt, 'gram.ckpt', {'teacher': abstract_params}, config, mesh)
    updates['gram_teacher'] = teacher['teacher']['backbone']
  updates = {name: jax.device_put(tree, getattr(shardings, name)) for name, tree in updates.items()}
  return state.replace(**updates)
