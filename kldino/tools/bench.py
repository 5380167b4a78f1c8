"""The benchmark: how fast the train step, the prior pass and the input pipeline run, and how close
to the machine's peak.

    python -m kldino.bench --preset=tiny32 [--steps=10] [--json]
    python -m kldino.bench --preset=input --config=CONFIG [--config.KEY=VALUE ...] [--json]

Measured after warm-up, over `--steps` runs with no host synchronisation inside the timed loop:
the train step (time, images/s counting an image with all its crops, FLOP/s from XLA's cost
analysis, MFU against kldino/runtime/hardware.py's peak), the prior pass (images/s, MFU, its share
of an epoch at T = 1), the input pipeline and memory. Presets use random inputs, float32, and the
shapes of PRESETS, to compare with the official DINO (`--baseline=torch`). `--preset=input`
measures a config's training input alone on its own data. What each figure means and the
measurements: docs/performance.md and docs/input.md.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from kldino.runtime import hardware
from kldino.runtime import host_memory
from kldino.tools import profiling
from kldino.core import objective
from kldino.data import masking
from kldino.core import program as program_lib
from kldino.core import sharding
from kldino.core import step as step_lib
from kldino.core import prior_pass
from kldino.runtime import xla_env
from kldino.config.defaults import base_config

_PRESET = flags.DEFINE_string('preset', 'tiny32',
                              'tiny32 | small224 | digits | dinov2_s14 | dinov3_s16 | input')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, '--preset=input: the experiment config (get_config()) whose training input '
    'to measure, e.g. configs/imagenet_vit_s16.py with --config.data.name=folder '
    '--config.data.path=ROOT')
_STEPS = flags.DEFINE_integer(
    'steps', 10, 'timed runs of the step (and of the prior-pass batch); '
    '--preset=input: timed batches')
_JSON = flags.DEFINE_bool('json', False, 'end with one JSON line of the results')
_BASELINE = flags.DEFINE_string(
    'baseline', '', "'torch': also time the same step in PyTorch (kldino/tools/torch_baseline.py, "
    "the torch extra), in turn with kldino's (A B A B), and report speedup_vs_baseline")
_PROFILE = flags.DEFINE_string(
    'profile', '', 'trace the step and the prior pass into this folder and report where the time '
    'goes: by kind of op, by kldino source line, and the top ops (kldino/tools/profiling.py); with '
    '--baseline=torch the PyTorch step too (kldino/tools/torch_profiling.py)')

# Training images per epoch for the prior pass's share: CIFAR-sized data at 32x32, ImageNet at 224.
EPOCH_IMAGES = {
    'tiny32': 50_000,
    'small224': 1_281_167,
    'digits': 1347,
    'dinov2_s14': 1_281_167,
    'dinov3_s16': 1_281_167
}


def _vit_preset(config, *, name, patch, global_size, local_size, prototypes, batch,
                prior_pass_batch):
  config.model.update(name=name,
                      patch_size=patch,
                      drop_path=0.1,
                      num_prototypes=prototypes,
                      head_hidden_dim=2048,
                      head_bottleneck_dim=256,
                      head_num_layers=3,
                      head_norm='none',
                      prototype_init_std=0.02)
  config.aug.update(global_size=global_size, local_size=local_size, num_local=6)
  config.data.image_size = global_size
  config.data.mean, config.data.std = (0.5,) * 3, (0.5,) * 3
  config.batch_size, config.prior_pass_batch_size = batch, prior_pass_batch
  return config


def _small_preset(config, patch_size: int, local_size: int):
  """A family's ImageNet recipe on ViT-S at float32: 2 x 224 + 8 x `local_size` crops, K = 65536,
  batch 8, KoLeo over the batch, one device."""
  config.model.update(name='vit_small', patch_size=patch_size, remat=False, compute_dtype='float32')
  config.aug.update(global_size=224, local_size=local_size)
  config.batch_size, config.prior_pass_batch_size = 8, 32
  config.objective.koleo_group_size = 0
  config.mesh.fsdp = 1
  return config


def _dinov2_preset():
  """DINOv2's ViT-S/14 objective (configs/imagenet_dinov2_vitl16.py's): 2 x 224 + 8 x 98 crops,
  iBOT on the shared head, KoLeo, LayerScale, the prior on image and patch targets."""
  from configs import imagenet_dinov2_vitl16  # pylint: disable=g-import-not-at-top
  return _small_preset(imagenet_dinov2_vitl16.get_config(), 14, 98)


def _dinov3_preset():
  """DINOv3's ViT-S/16 objective (configs/imagenet_dinov3_vitl16.py's): 2 x 224 + 8 x 96 crops,
  RoPE, iBOT on a separate head, KoLeo, LayerScale, Sinkhorn-Knopp on image and patch targets."""
  from configs import imagenet_dinov3_vitl16  # pylint: disable=g-import-not-at-top
  return _small_preset(imagenet_dinov3_vitl16.get_config(), 16, 96)


def _digits_config():
  """configs/digits.py, the embedded default, as `make pretrain` runs it."""
  try:
    from configs import digits  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise app.UsageError('preset digits reads configs/digits.py: run the benchmark from a '
                         'checkout of kldino (pip install -e .)') from None
  return digits.get_config()


# name -> (build the config, input channels)
PRESETS = {
    'tiny32': (
        lambda: _vit_preset(  # ViT-Ti/4, 2 x 32 + 6 x 16 crops
            base_config(),
            name='vit_tiny',
            patch=4,
            global_size=32,
            local_size=16,
            prototypes=4096,
            batch=64,
            prior_pass_batch=256),
        3),
    'small224': (
        lambda: _vit_preset(  # ViT-S/16, 2 x 224 + 6 x 96 crops
            base_config(),
            name='vit_small',
            patch=16,
            global_size=224,
            local_size=96,
            prototypes=65536,
            batch=8,
            prior_pass_batch=32),
        3),
    'digits': (_digits_config, 1),
    'dinov2_s14': (_dinov2_preset, 3),
    'dinov3_s16': (_dinov3_preset, 3),
}


def preset_config(name: str):
  """(config, input channels) of a preset."""
  if name not in PRESETS:
    raise app.UsageError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
  build, channels = PRESETS[name]
  return build(), channels


def _time(run, steps: int) -> tuple[float, float]:
  """(seconds, minor page faults) per call of run(), after a warm-up, with one sync at the end:
  run() returns an output of its call (alive until the next call, which may donate it). The
  faults show whether the host buffers of each call are mapped afresh
  (kldino/runtime/host_memory.py)."""
  jax.block_until_ready(run())
  jax.block_until_ready(run())
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  start = time.perf_counter()
  for _ in range(steps):
    last = run()
  jax.block_until_ready(last)
  seconds = (time.perf_counter() - start) / steps
  return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps


def random_crops(config, channels: int) -> dict:
  """A training batch of normal noise: global_crops [B, 2, G, G, C], local_crops [B, L, l, l, C]."""
  rng = np.random.default_rng(0)
  g, local, b = config.aug.global_size, config.aug.local_size, config.batch_size
  crops = {
      'global_crops':
          rng.standard_normal((b, 2, g, g, channels), np.float32),
      'local_crops':
          rng.standard_normal((b, config.aug.num_local, local, local, channels), np.float32)
  }
  if masking.used(config.objective):  # iBOT's masks, as the pipeline draws them
    crops['masks'] = masking.training_masks(config,
                                            epoch=0,
                                            step=0,
                                            first_row=0,
                                            rows=b,
                                            group=masking.group_size(config, jax.device_count()))
  return crops


def _random_batch(config, channels: int, mesh):
  # On device before timing.
  return jax.device_put(random_crops(config, channels), sharding.batch_sharding(mesh))


def _profile(run, compiled, profile_dir: str, name: str) -> dict:
  """{'NAME_profile': where the time of two traced calls went}, or {} without --profile."""
  if not profile_dir:
    return {}
  return {
      f'{name}_profile':
          profiling.profile_calls(run, 2, os.path.join(profile_dir, name), compiled.as_text())
  }


def bench_train_step(config, channels: int, mesh, steps: int, profile_dir: str = '') -> dict:
  graphdef, _ = step_lib.build_graphdef(config, channels)
  program = program_lib.build(config, graphdef, channels, mesh, steps_per_epoch=1000)
  batch = _random_batch(config, channels, mesh)
  state = program.init(config.seed)
  compiled = program.train_step.lower(state, batch).compile()
  holder = {'state': state}

  def run():  # the state is donated: carry it from step to step as training does
    holder['state'], metrics = compiled(holder['state'], batch)
    return metrics['loss']

  seconds, page_faults = _time(run, steps)
  profile = _profile(run, compiled, profile_dir, 'step')
  memory = compiled.memory_analysis()
  return {
      'step_ms':
          1e3 * seconds,
      'images_per_sec':
          config.batch_size / seconds,
      'step_page_faults':
          page_faults,
      'step_flops':
          hardware.program_flops(compiled, mesh.devices.size),
      'step_memory_bytes':
          int(memory.argument_size_in_bytes + memory.output_size_in_bytes +
              memory.temp_size_in_bytes - memory.alias_size_in_bytes),
      'teacher':
          holder['state'].teacher,
      'program':
          program,
      'run':
          run,
      **profile,
  }


def bench_prior_pass(config,
                     channels: int,
                     mesh,
                     program,
                     teacher,
                     steps: int,
                     profile_dir: str = '') -> dict:
  size, b = config.data.image_size, config.prior_pass_batch_size
  batch = jax.device_put(
      {
          'image': np.random.default_rng(1).standard_normal((b, size, size, channels), np.float32),
          'mask': np.ones((b,), bool)
      }, sharding.batch_sharding(mesh))
  replicated = sharding.replicated(mesh)
  sums = jax.device_put(
      prior_pass.init_sums(config.model.num_prototypes,
                           patches=objective.uses_ibot(config.objective)), replicated)
  temp = jnp.float32(config.objective.teacher_temp)
  compiled = program.prior_pass.accumulate.lower(sums, teacher, batch, temp).compile()
  holder = {'sums': sums}

  def run():
    holder['sums'] = compiled(holder['sums'], teacher, batch, temp)
    return holder['sums']['count']

  seconds, _ = _time(run, steps)
  profile = _profile(run, compiled, profile_dir, 'prior_pass')
  summary = prior_pass.summarise(holder['sums'], config.objective.prior_eps)
  gap_args = (teacher, batch, temp, summary['log_prior'], summary['mean_logits'])
  gap_holder = {'sums': jax.device_put(prior_pass.init_gap_sums(), replicated)}
  gap_compiled = program.prior_pass.gap_accumulate.lower(gap_holder['sums'], *gap_args).compile()

  def run_gap():
    gap_holder['sums'] = gap_compiled(gap_holder['sums'], *gap_args)
    return gap_holder['sums']['count']

  gap_seconds, _ = _time(run_gap, steps)
  return {
      'pass_images_per_sec': b / seconds,
      'pass_flops': hardware.program_flops(compiled, mesh.devices.size),
      'prior_seconds_per_image': seconds / b,
      'gap_seconds_per_image': gap_seconds / b,
      **profile
  }


def input_rates(source, config, steps: int, warmup: int = 2) -> tuple[float, float]:
  """(images/s, process CPU seconds per image) of pipeline.train_batches over `steps` batches
  after `warmup` batches, epoch after epoch as training reads them."""
  from kldino.data import pipeline  # pylint: disable=g-import-not-at-top

  def batches():
    for epoch in range(2**31):
      yield from pipeline.train_batches(source, config, epoch=epoch)

  stream = batches()
  for _ in range(warmup):  # builds and warms the pipeline (and fills its cache)
    next(stream)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(steps):
    next(stream)
  images = steps * config.batch_size
  return images / (time.perf_counter() - start), (time.process_time() - cpu_start) / images


def bench_input(config, steps: int) -> float:
  """Images/s of the multi-crop pipeline on the digits, upscaled to the preset's image size."""
  from kldino.data import datasets  # pylint: disable=g-import-not-at-top
  data_config = config.copy_and_resolve_references()
  data_config.data.update(name='digits',
                          mean=(0.5,),
                          std=(0.5,),
                          train_split='train',
                          eval_split='test')
  source = datasets.get_source(data_config.data)
  return input_rates(source, data_config, steps, warmup=1)[0]


def run_input_benchmark(config, steps: int) -> dict:
  """--preset=input: the training input of `config` on its own data, on the host alone."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from kldino.data import datasets  # pylint: disable=g-import-not-at-top
  source = datasets.get_source(config.data)
  images_per_sec, cpu_seconds_per_image = input_rates(source, config, steps)
  aug = config.aug
  return {
      'preset': 'input',
      'dataset': config.data.name,
      'path': config.data.path,
      'train_examples': source.num_examples(config.data.train_split),
      'batch_size': config.batch_size,
      'crops': f'2x{aug.global_size} + {aug.num_local}x{aug.local_size}',
      'cpu_count': os.cpu_count(),
      'tensorflow': tf.__version__,
      'input_cpu_ms_per_image': 1e3 * cpu_seconds_per_image,
      'input_images_per_sec': images_per_sec,
      'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
  }


def prior_pass_epoch_fraction(config, num_images: int, train: dict, prior: dict) -> float:
  """A prior pass (Q over every image, the Jensen gap over `objective.gap_examples`)
  over the time of one training epoch of `num_images`."""
  gap_images = min(num_images, config.objective.gap_examples or num_images)
  pass_seconds = (num_images * prior['prior_seconds_per_image'] +
                  gap_images * prior['gap_seconds_per_image'])
  return pass_seconds / (num_images / train['images_per_sec'])


def make_baseline(config, channels: int):
  """The PyTorch step of --baseline=torch (kldino/tools/torch_baseline.py), built before anything is
  compiled; a config it does not build, or no PyTorch, is a UsageError."""
  try:
    from kldino.tools import torch_baseline  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise app.UsageError("--baseline=torch needs PyTorch: pip install -e '.[torch]'") from None
  try:
    return torch_baseline.TorchDinoStep(config, channels, seed=config.seed)
  except ValueError as error:
    raise app.UsageError(f'--baseline=torch: {error}') from None


def bench_baseline(config,
                   channels: int,
                   baseline,
                   kldino_run,
                   steps: int,
                   rounds: int = 2,
                   profile: bool = False) -> dict:
  """kldino's train step and the PyTorch baseline's on the same batch, timed in turn (A B A B,
  `rounds` of each, `steps` calls a round), so that both see the machine in the same state; with
  `profile`, then where the baseline's time goes (kldino/tools/torch_profiling.py)."""
  import torch  # pylint: disable=g-import-not-at-top
  from kldino.tools import torch_profiling  # pylint: disable=g-import-not-at-top
  crops = {name: torch.from_numpy(array) for name, array in random_crops(config, channels).items()}
  kldino_seconds, baseline_seconds = [], []
  for _ in range(rounds):
    kldino_seconds.append(_time(kldino_run, steps)[0])
    baseline_seconds.append(_time(lambda: baseline.step(**crops), steps)[0])
  kldino_mean, baseline_mean = np.mean(kldino_seconds), np.mean(baseline_seconds)
  results = {
      'baseline': 'torch',
      'baseline_threads': torch.get_num_threads(),
      'baseline_step_ms': 1e3 * baseline_mean,
      'baseline_images_per_sec': config.batch_size / baseline_mean,
      'interleaved_step_ms': 1e3 * kldino_mean,
      'speedup_vs_baseline': baseline_mean / kldino_mean,
  }
  if profile:
    results['baseline_profile'] = torch_profiling.profile_calls(lambda: baseline.step(**crops), 2)
  return results


def run_benchmark(preset: str, steps: int, profile_dir: str = '', baseline: str = '') -> dict:
  config, channels = preset_config(preset)
  torch_step = make_baseline(config, channels) if baseline else None
  mesh = sharding.make_mesh(config.mesh)
  peak, peak_source = hardware.device_peak()
  train = bench_train_step(config, channels, mesh, steps, profile_dir)
  step_seconds = train['step_ms'] / 1e3
  prior = bench_prior_pass(config, channels, mesh, train['program'], train['teacher'], steps,
                           profile_dir)
  # After the prior pass: the steps timed here donate the state that held its teacher.
  compared = bench_baseline(
      config, channels, torch_step, train['run'], steps,
      profile=bool(profile_dir)) if baseline else {}
  pass_seconds = config.prior_pass_batch_size / prior['pass_images_per_sec']
  return {
      'preset': preset,
      'devices': jax.device_count(),
      'device': jax.devices()[0].device_kind,
      'step_ms': train['step_ms'],
      'images_per_sec': train['images_per_sec'],
      'step_tflops': train['step_flops'] / step_seconds / 1e12,
      'mfu': train['step_flops'] / step_seconds / peak,
      'peak_tflops': peak / 1e12,
      'peak_source': peak_source,
      # The JSON names the prior pass's figures sweep_* (keys scripts read: docs/performance.md).
      'sweep_images_per_sec': prior['pass_images_per_sec'],
      'sweep_mfu': prior['pass_flops'] / pass_seconds / peak,
      'sweep_epoch_fraction': prior_pass_epoch_fraction(config, EPOCH_IMAGES[preset], train, prior),
      'input_images_per_sec': bench_input(config, steps),
      'step_memory_gb': train['step_memory_bytes'] / 1e9,
      'step_page_faults': train['step_page_faults'],
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
      'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
      **compared,
      **{
          key: value for key, value in {
              **train,
              **prior
          }.items() if key.endswith('_profile')
      },
  }


def _log_profile(name: str, profile: dict):
  logging.info('%s: %.1f ms of op time per call (summed over threads)', name, profile['busy_ms'])
  for section in ('by_category_ms', 'by_source_ms', 'top_ops_ms'):
    for key, ms in profile[section].items():
      logging.info('  %-14s %8.1f ms  %s', section[:-3], ms, key)


def main(argv):
  xla_env.set_xla_flags()  # before JAX's backend starts: the figures are measured with them
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _STEPS.value < 1:
    sys.exit(f'kldino.bench: --steps={_STEPS.value} must be >= 1')
  if _BASELINE.value not in ('', 'torch'):
    raise app.UsageError(f"--baseline={_BASELINE.value}: the baseline is 'torch' (or none)")
  if _BASELINE.value and _PRESET.value == 'input':
    raise app.UsageError('--baseline compares train steps: use it with a model preset')
  if (_PRESET.value == 'input') != (_CONFIG.value is not None):
    raise app.UsageError('--config is what --preset=input measures, and only it: pass '
                         '--preset=input --config=CONFIG, or a model preset without --config')
  if _PRESET.value == 'input':
    results = run_input_benchmark(_CONFIG.value, _STEPS.value)
  else:
    host_memory.reexec_with_huge_pages()  # XLA:CPU's per-call buffers (runtime/host_memory.py)
    results = run_benchmark(_PRESET.value, _STEPS.value, _PROFILE.value, _BASELINE.value)
  for key, value in results.items():
    if isinstance(value, dict):
      _log_profile(key, value)
    else:
      logging.info('%-22s %s', key, f'{value:.4g}' if isinstance(value, float) else value)
  if _JSON.value:
    print(json.dumps(results, sort_keys=True), flush=True)
