"""The --modes of `python -m kldino.main`: one registration each (MODES), one module each."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from kldino.registry import Registry
from kldino.runtime import xla_env

MODES = Registry('mode', key='--mode')


@dataclasses.dataclass(frozen=True)
class Mode:
  """What the entry point (kldino/main.py) needs to know of a mode before loading anything: the
  flags it takes (and needs), what `--output` is for it, whether it writes the workdir (and holds
  its lock) and whether it reads the workdir's own config. Its module, kldino/modes/<module>.py,
  defines `run(config, workdir, **flags) -> dict`, the JSON line printed. Registering imports
  nothing heavy: `--help` and flag errors answer before JAX or TensorFlow load."""
  name: str
  summary: str  # one line for --help
  module: str = ''  # kldino/modes/<module>.py (default: the name)
  flags: tuple[str, ...] = ()  # the flags passed to run() as keyword arguments
  required: tuple[str, ...] = ()  # of those, the ones it cannot run without
  output: str = ''  # what --output is ('' : the mode takes none)
  output_is_folder: bool = False
  writes_workdir: bool = False  # holds the workdir's lock while it runs
  reads_workdir_config: bool = False  # without --config: the workdir's config.json
  needs_workdir: bool = True
  single_process: bool = False  # never starts jax.distributed
  before_jax: Callable | None = None  # config -> None, run before JAX loads

  def load(self) -> Callable[..., dict]:
    """The mode's run(config, workdir, **flags)."""
    return importlib.import_module(f'kldino.modes.{self.module or self.name}').run


def _register(name: str, **spec):
  MODES.register(name)(Mode(name=name, **spec))


_CHECKPOINT = dict(reads_workdir_config=True, flags=('step', 'output'))
# The modes that draw what a checkpoint's ViT teacher makes of images, into a folder.
_PICTURES = dict(output_is_folder=True,
                 reads_workdir_config=True,
                 flags=('step', 'output', 'split', 'num_images', 'inputs'),
                 required=('output',))

_register('train',
          summary='train (resuming from the latest checkpoint), then evaluate the teacher',
          writes_workdir=True)
_register('eval',
          summary="the config's final evaluators on a checkpoint's teacher",
          output='JSON path (default DIR/eval.json)',
          **_CHECKPOINT)
_register('linear_eval',
          summary="DINO's linear evaluation of a checkpoint's teacher",
          output='JSON path (default DIR/linear_eval.json)',
          writes_workdir=True,
          **_CHECKPOINT)
_register('features',
          summary="a checkpoint's features of a split or of --inputs, as .npy",
          output='.npy path (default DIR/features_<split>_step<S>.npy)',
          reads_workdir_config=True,
          flags=('step', 'output', 'split', 'inputs'))
_register('export',
          summary="a checkpoint's teacher backbone as an .npz, or with --format=pth a PyTorch "
          'state dict in the official layout',
          output='.npz / .pth path (default DIR/backbone_step<S>.<format>)',
          reads_workdir_config=True,
          flags=('step', 'output', 'format'))
_register('import',
          module='import_dino',
          summary="an official DINO or DINOv2 .pth as the workdir's step-0 checkpoint",
          flags=('import_from',),
          required=('import_from',),
          writes_workdir=True)
_register('preview',
          summary='the input as the model sees it (evaluation views, training crops) as PNGs',
          output='the folder for the PNGs and index.json',
          output_is_folder=True,
          flags=('output', 'split', 'num_images'),
          required=('output',),
          needs_workdir=False)
_register('attention',
          summary="the teacher's last-block CLS attention per head, as .npy and PNGs",
          output='the folder for attention.npy, index.json and the PNGs',
          **_PICTURES)
_register('pca',
          summary="DINOv2's PCA of the teacher's patch tokens (foreground, RGB), as .npy and PNGs",
          output='the folder for pca.npy, index.json, the PNGs and sheet.png',
          **_PICTURES)
_register('plan',
          summary="whether the config fits its hardware (hardware.*) and how long it takes",
          needs_workdir=False,
          single_process=True,
          before_jax=lambda config: xla_env.set_plan_flags(config.hardware.devices))
