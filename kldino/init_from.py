"""A run that starts from another run's checkpoint (`init_from`), and a Gram teacher read from one
(`gram.ckpt`): DINOv3's later phases (its high-resolution adaptation starts from the pretrained
weights with a new optimizer and schedules; dinov3/train/ssl_meta_arch.py:init_weights).

`start_from` takes a freshly initialised train state (step 0, a new optimizer and normalisation
state) and puts in the source's student and teacher, and with Gram anchoring its Gram teacher
(its teacher's backbone when it holds none); `gram.ckpt` then sets the Gram teacher to that
checkpoint's teacher backbone. The model must be the same (its parameters' shapes); a learned
position table of another grid (another aug.global_size) is resized once here, as the ViT
resizes it for another grid at run time (model.pos_interpolation), so that the network computes
at the new size exactly what the source computed there. Only a fresh run reads its source: a run
with checkpoints of its own resumes from them.
"""
from __future__ import annotations

import jax
from absl import logging

from kldino import checkpoint as checkpoint_lib
from kldino.config.workdir import upgrade
from kldino.core import gram as gram_lib
from kldino.core import sharding
from kldino.errors import ConfigError
from kldino.models.vit import resize_position_table

_POSITION_TABLE = 'pos_embed'  # a ViT backbone's learned table (the Gram teacher's too)


def _is_position_table(name: str) -> bool:
  return name.rpartition('/')[2] == _POSITION_TABLE


def _open(spec: str, key: str) -> tuple[checkpoint_lib.Checkpointer, int]:
  """The source's checkpointer and step (its newest when the spec names none)."""
  workdir, step = checkpoint_lib.parse_source(spec)
  try:
    checkpointer = checkpoint_lib.Checkpointer(workdir, every_steps=1, keep=1, read_only=True)
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
