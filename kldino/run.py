"""Open a run: what every mode needs to read or write a workdir, and nothing that trains.

A `Run` holds the checked config, the device mesh, the model's static structure, the shapes and
shardings of its parameters, and the workdir's checkpointer. The data source and the schedules
are made on first use, so that the modes that read no dataset (import, export, features of
given arrays) need nothing but the config and the weights. Training (kldino/train.py) builds its
program (kldino/core/program.py) on top of a Run; evaluation (kldino/evaluate/) and the other
modes (kldino/modes/) use a Run alone.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kldino import checkpoint as checkpoint_lib
from kldino.models import forward
from kldino.core import objective
from kldino.core import schedules as schedules_lib
from kldino.core import sharding
from kldino.core import step as step_lib
from kldino.config.checks import validate_config
from kldino.errors import ConfigError, DataError
from kldino.data import datasets, pipeline


class Run:
  """A workdir and the config it runs with; see the module docstring."""

  def __init__(self, config, workdir: str):
    validate_config(config, jax.device_count(), jax.process_count())
    self.config = config
    self.workdir = workdir
    # The model's input channels: data.mean has one value per channel (checked against the
    # dataset when one is read), so that no dataset is needed to build the model.
    self.in_channels = len(config.data.mean)
    self.mesh = sharding.make_mesh(config.mesh)
    self.normalization = objective.get_normalization(config.objective)
    self.graphdef, abstract_params = step_lib.build_graphdef(config, self.in_channels)
    self.param_shardings = sharding.state_shardings(abstract_params, self.mesh,
                                                    config.mesh.fsdp_min_size)
    self.abstract_params = jax.tree.map(
        lambda leaf, leaf_sharding: jax.ShapeDtypeStruct(
            leaf.shape, leaf.dtype, sharding=leaf_sharding), abstract_params, self.param_shardings)
    try:
      self.data_shards = pipeline.num_shards(config.data, jax.process_count())
    except ValueError as error:
      raise ConfigError(str(error)) from None

  @functools.cached_property
  def checkpointer(self) -> checkpoint_lib.Checkpointer:
    """The workdir's checkpoints, opened on first use (after the cheap checks of the data)."""
    config = self.config
    return checkpoint_lib.Checkpointer(self.workdir,
                                       every_steps=config.checkpoint_every_steps,
                                       keep=config.keep_checkpoints)

  @functools.cached_property
  def source(self) -> datasets.Source:
    """The config's dataset, opened (metadata only) on first use."""
    try:
      source = datasets.get_source(self.config.data)
    except ValueError as error:  # the data registry's one-line messages
      raise DataError(str(error)) from None
    if source.info.num_channels != self.in_channels:
      raise ConfigError(
          f'data.mean and data.std have {self.in_channels} values but {self.config.data.name} '
          f'images have {source.info.num_channels} channels: set both to '
          f'{source.info.num_channels} values')
    return source

  @functools.cached_property
  def steps_per_epoch(self) -> int:
    config = self.config
    num_train = self.source.num_examples(config.data.train_split)
    steps = pipeline.steps_per_epoch(num_train, config.batch_size, self.data_shards)
    if steps < 1:
      raise ConfigError(f'batch_size={config.batch_size} is larger than the {num_train} training '
                        'examples: lower --config.batch_size')
    return steps

  @functools.cached_property
  def schedules(self) -> schedules_lib.Schedules:
    return schedules_lib.make_schedules(self.config, self.steps_per_epoch)

  @property
  def feature_options(self) -> dict:
    """DINO's linear-evaluation features (eval.n_last_blocks, eval.avgpool_patchtokens), as
    kldino/models/forward.py:backbone_features takes them."""
    return {
        'n_last_blocks': self.config.eval.n_last_blocks,
        'avgpool_patchtokens': self.config.eval.avgpool_patchtokens
    }

  def feature_dim(self, **feature_options) -> int:
    """The width of the backbone's features (kldino/models/forward.py:backbone_features), from
    shapes."""
    size = self.config.data.image_size
    images = jax.ShapeDtypeStruct((1, size, size, self.in_channels), jnp.float32)
    features = jax.eval_shape(
        lambda params, batch: forward.backbone_features(
            self.graphdef, params, batch, **feature_options), self.abstract_params, images)
    return int(features.shape[-1])

  def teacher_temp(self, step: int) -> float:
    """The teacher temperature of the training schedule at `step` (the evaluation's tau_t)."""
    return float(self.schedules.teacher_temp(step))

  def restore_teacher(self, step: int | None = None):
    """(teacher parameters, step) from the latest readable or the given checkpoint."""
    teacher, step = self.checkpointer.restore_teacher(self.abstract_params, self.config, step=step)
    if teacher is None:
      raise ConfigError(f'no readable checkpoint in {self.checkpointer.directory}: train first '
                        'or pass the --workdir of a training run')
    return teacher, step

  def check_training_order(self):
    """Refuses, before anything is read, a data.shuffle that the dataset cannot give."""
    source = self.source  # its own errors are the data's (DataError), raised as they are
    try:
      pipeline.check_shuffle(source, self.config, jax.process_count())
    except ValueError as error:
      raise ConfigError(str(error)) from None
