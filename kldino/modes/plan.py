"""`--mode=plan`: whether a config fits its hardware and how long it will take, before launch.

    python -m kldino.main --mode=plan --config=configs/imagenet_scale.py:vit_b16,v5p-128

The hardware is the config's (`hardware.*`), or this machine when hardware.devices is 0. The train
step and the prior pass are compiled for that many simulated CPU devices (the entry point sets
them, kldino/runtime/xla_env.py:set_plan_flags) on abstract arrays with the run's shardings,
allocating nothing; from them come the state and the step's memory per device (XLA's analysis),
the FLOPs per step, image and prior pass, and the times at an assumed MFU (hardware.mfu). It fits
when the step's memory is at most FIT_FRACTION of a device's; otherwise `fix` names one change
(mesh.fsdp, model.remat or the batch). How the figures are made and what they were on each
config: docs/plan.md.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp

from kldino.core import objective
from kldino.core import prior_pass
from kldino.core import program as program_lib
from kldino.core import sharding
from kldino.core import step as step_lib
from kldino.config.checks import validate_config
from kldino.errors import ConfigError
from kldino.runtime import hardware

FIT_FRACTION = 0.9  # of a device's memory: the runtime, the input's buffers and fragmentation
# Training images of TFDS datasets a plan may name without them on this machine (TFDS's counts).
TRAIN_EXAMPLES = {
    'imagenet2012': 1_281_167,
    'imagenet2012_subset/1pct': 12_811,
    'imagenet2012_subset/10pct': 128_116
}
_GIB = 2**30


def _machine(config) -> dict:
  """hardware.* of the config, or this machine's devices, memory and peak."""
  hardware = config.hardware
  if hardware.devices:
    return {
        'name': hardware.name or f'{hardware.devices} devices',
        'kind': hardware.kind,
        'devices': hardware.devices,
        'hosts': hardware.hosts,
        'memory_bytes': hardware.memory_gib * _GIB,
        'peak_flops': hardware.peak_tflops * 1e12
    }
  peak, _ = hardware.device_peak()
  devices = jax.devices()
  memory = devices[0].memory_stats() or {}
  memory_bytes = memory.get('bytes_limit') or (os.sysconf('SC_PAGE_SIZE') *
                                               os.sysconf('SC_PHYS_PAGES') / len(devices))
  return {
      'name': f'this machine ({devices[0].device_kind})',
      'kind': devices[0].platform,
      'devices': len(devices),
      'hosts': jax.process_count(),
      'memory_bytes': memory_bytes,
      'peak_flops': peak / len(devices)
  }


def _bytes_per_device(tree) -> int:
  """Bytes of one device's shards of a tree of sharded abstract arrays."""
  return int(
      sum(
          math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
          for leaf in jax.tree.leaves(tree)))


def _train_examples(config) -> int:
  if config.data.name in TRAIN_EXAMPLES:
    return TRAIN_EXAMPLES[config.data.name]
  from kldino.data import datasets  # pylint: disable=g-import-not-at-top
  return datasets.get_source(config.data).num_examples(config.data.train_split)


def _compiled_programs(config, channels: int, mesh, steps_per_epoch: int):
  """The train step and the prior pass's accumulation over one batch, compiled on abstract
  arrays, and the abstract sharded state."""
  graphdef, _ = step_lib.build_graphdef(config, channels)
  program = program_lib.build(config, graphdef, channels, mesh, steps_per_epoch)
  state = program.abstract_state
  step = program.train_step.lower(state, program_lib.abstract_train_batch(config, channels,
                                                                          mesh)).compile()
  size, batch_sharding = config.data.image_size, sharding.batch_sharding(mesh)
  batch = {
      'image':
          jax.ShapeDtypeStruct((config.prior_pass_batch_size, size, size, channels),
                               jnp.float32,
                               sharding=batch_sharding),
      'mask':
          jax.ShapeDtypeStruct((config.prior_pass_batch_size,), jnp.bool_, sharding=batch_sharding)
  }
  replicated = sharding.replicated(mesh)
  sums = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
      jax.eval_shape(lambda: prior_pass.init_sums(config.model.num_prototypes,
                                                  patches=objective.uses_ibot(config.objective))))
  temp = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
  prior = program.prior_pass.accumulate.lower(sums, state.teacher, batch, temp).compile()
  return step, prior, state


def make_plan(config) -> dict:
  """The plan of `config` on its hardware (module docstring): a flat dict, the JSON line."""
  machine = _machine(config)
  devices = jax.devices()[:machine['devices']]
  if len(devices) < machine['devices']:
    raise ValueError(f"hardware.devices={machine['devices']} but JAX has {len(devices)} devices: "
                     'run --mode=plan through python -m kldino.main, which simulates them')
  mesh = sharding.make_mesh(config.mesh, devices)
  channels = len(config.data.mean)
  train_examples = _train_examples(config)
  steps_per_epoch = train_examples // config.batch_size
  compiled, pass_compiled, state = _compiled_programs(config, channels, mesh, steps_per_epoch)
  memory = compiled.memory_analysis()
  step_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
                memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  step_flops = hardware.program_flops(compiled, len(devices))
  prior_pass_flops_per_image = (hardware.program_flops(pass_compiled, len(devices)) /
                                config.prior_pass_batch_size)
  cluster_flops = machine['peak_flops'] * len(devices) * config.hardware.mfu
  step_seconds = step_flops / cluster_flops
  passes_per_epoch = 1 / config.objective.prior_every_epochs if objective.uses_prior_pass(
      config.objective) else 0.0
  epoch_seconds = (steps_per_epoch * step_seconds +
                   passes_per_epoch * train_examples * prior_pass_flops_per_image / cluster_flops)
  fits = step_bytes <= FIT_FRACTION * machine['memory_bytes']
  return {
      'hardware': machine['name'],
      'devices': len(devices),
      'hosts': machine['hosts'],
      'model': config.model.name,
      'batch_size': config.batch_size,
      'mesh_fsdp': config.mesh.fsdp,
      'remat': bool(config.model.remat),
      'compute_dtype': config.model.compute_dtype,
      'parameters': int(sum(leaf.size for leaf in jax.tree.leaves(state.student))),
      'params_bytes_per_device': _bytes_per_device((state.student, state.teacher)),
      'optimizer_bytes_per_device': _bytes_per_device(state.opt_state),
      'step_memory_bytes_per_device': int(step_bytes),
      'step_temp_bytes_per_device': int(memory.temp_size_in_bytes),
      'device_memory_bytes': int(machine['memory_bytes']),
      'fits': bool(fits),
      'step_flops': step_flops,
      'flops_per_image': step_flops / config.batch_size,
      'prior_pass_flops_per_image': prior_pass_flops_per_image,
      'assumed_mfu': config.hardware.mfu,
      'peak_tflops_per_device': machine['peak_flops'] / 1e12,
      'step_seconds': step_seconds,
      'train_examples': train_examples,
      'steps_per_epoch': steps_per_epoch,
      'epoch_hours': epoch_seconds / 3600,
      'run_hours': config.num_epochs * epoch_seconds / 3600,
      'num_epochs': config.num_epochs,
      'launch': _launch(machine),
  }


def _launch(machine: dict) -> str:
  """The TPU VM a TPU plan implies (launch/tpu_vm.py picks the same software version)."""
  if machine['kind'] != 'tpu':
    return ''
  from launch import tpu_vm  # pylint: disable=g-import-not-at-top
  try:
    version = tpu_vm.software_version(machine['name'])
  except ValueError as error:
    return str(error)
  return (f"python -m launch.tpu_vm --accelerator={machine['name']} (creates it with "
          f'--version={version})')


def fix(plan: dict, config) -> str | None:
  """One line naming the change that makes a plan that does not fit fit; None when it fits."""
  if plan['fits']:
    return None
  need, have = plan['step_memory_bytes_per_device'] / _GIB, plan['device_memory_bytes'] / _GIB
  state = plan['params_bytes_per_device'] + plan['optimizer_bytes_per_device']
  fsdp = config.mesh.fsdp
  if state > plan['step_temp_bytes_per_device'] and 2 * fsdp <= plan['devices'] and (
      plan['devices'] % (2 * fsdp) == 0):
    change = f'--config.mesh.fsdp={2 * fsdp} (the state is most of it)'
  elif not plan['remat']:
    change = '--config.model.remat=True (the activations are most of it)'
  else:
    change = f'--config.batch_size={config.batch_size // 2} (and the lr scales with it)'
  return (f"{plan['model']} at batch {plan['batch_size']} needs {need:.1f} GiB per device on "
          f"{plan['hardware']} ({have:.0f} GiB each, at most {FIT_FRACTION:.0%} usable): "
          f'set {change}')


def table(plan: dict) -> str:
  """The plan as aligned lines for a person."""
  gib = lambda key: f'{plan[key] / _GIB:.2f} GiB'
  rows = [
      ('hardware', f"{plan['hardware']}: {plan['devices']} devices, {plan['hosts']} hosts, "
       f"{plan['device_memory_bytes'] / _GIB:.0f} GiB and "
       f"{plan['peak_tflops_per_device']:.0f} TFLOP/s each"),
      ('model', f"{plan['model']}, {plan['parameters'] / 1e6:.1f} M parameters, "
       f"{plan['compute_dtype']}, remat {plan['remat']}"),
      ('batch, mesh', f"{plan['batch_size']} global, fsdp {plan['mesh_fsdp']}"),
      ('params per device', gib('params_bytes_per_device') + ' (student + teacher)'),
      ('optimizer per device', gib('optimizer_bytes_per_device')),
      ('step memory per device', f"{gib('step_memory_bytes_per_device')} "
       f"(temporaries {gib('step_temp_bytes_per_device')})"),
      ('fits', f"{'yes' if plan['fits'] else 'NO'} "
       f'(<= {FIT_FRACTION:.0%} of {gib("device_memory_bytes")})'),
      ('FLOPs', f"{plan['step_flops'] / 1e12:.1f} TFLOP per step, "
       f"{plan['flops_per_image'] / 1e9:.1f} GFLOP per image, prior pass "
       f"{plan['prior_pass_flops_per_image'] / 1e9:.1f} GFLOP per image"),
      ('time', f"{plan['step_seconds']:.3f} s per step at {plan['assumed_mfu']:.0%} MFU, "
       f"{plan['epoch_hours']:.2f} h per epoch of {plan['steps_per_epoch']} steps, "
       f"{plan['run_hours']:.1f} h for {plan['num_epochs']} epochs"),
  ]
  if plan['launch']:
    rows.append(('launch', plan['launch']))
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)


def run(config, workdir: str | None) -> dict:
  """The table on stdout, then the plan (the JSON line); a plan that does not fit prints both and
  ends with the line naming the fix (exit 2)."""
  del workdir  # a plan writes nothing
  devices = config.hardware.devices
  try:
    validate_config(config,
                    num_devices=devices or jax.device_count(),
                    num_processes=config.hardware.hosts if devices else jax.process_count())
    plan = make_plan(config)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  print(table(plan), flush=True)
  problem = fix(plan, config)
  if problem:
    print(json.dumps(plan, sort_keys=True), flush=True)
    raise ConfigError(f'does not fit: {problem}')
  return plan
