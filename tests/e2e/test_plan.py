"""--mode=plan (kldino/modes/plan.py): the state and step memory per device of simulated hardware,
the refusal of a plan that does not fit with the fix, and the fix then fitting."""
import json

from kldino import errors
from tests.helpers import run_kldino

_SMOKE = [
    '--config=configs/smoke.py', '--config.hardware.name=test-4', '--config.hardware.devices=4',
    '--config.hardware.peak_tflops=100', '--config.batch_size=64'
]


def _plan(*overrides):
  result = run_kldino('--mode=plan', *_SMOKE, *overrides, env={'JAX_PLATFORMS': 'cpu'})
  lines = result.stdout.strip().splitlines()
  plan = json.loads(lines[-1]) if lines and lines[-1].startswith('{') else None
  return result, plan


def test_plan_measures_the_state_and_refuses_what_does_not_fit_with_the_fix():
  result, roomy = _plan('--config.hardware.memory_gib=64')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'step memory per device' in result.stdout and 'fits' in result.stdout
  assert roomy['devices'] == 4 and roomy['fits']
  # float32 student and teacher, replicated (mesh.fsdp 1): 8 bytes per parameter on each device;
  # AdamW's two moments as much again.
  assert roomy['params_bytes_per_device'] == 8 * roomy['parameters']
  assert roomy['optimizer_bytes_per_device'] >= 8 * roomy['parameters']
  assert roomy['flops_per_image'] * 64 == roomy['step_flops'] > 0
  assert roomy['step_seconds'] == roomy['step_flops'] / (4 * 100e12 * roomy['assumed_mfu'])
  # Sharding the state over an FSDP group of 4 leaves about a quarter of it on each device.
  _, sharded = _plan('--config.hardware.memory_gib=64', '--config.mesh.fsdp=4')
  assert sharded['params_bytes_per_device'] < 0.5 * roomy['params_bytes_per_device']
  # A device smaller than the step: refused with the one fix, which then fits.
  _, remat = _plan('--config.hardware.memory_gib=64', '--config.model.remat=True')
  assert remat['step_memory_bytes_per_device'] < roomy['step_memory_bytes_per_device']
  between = (remat['step_memory_bytes_per_device'] + roomy['step_memory_bytes_per_device']) / 2
  memory = f'--config.hardware.memory_gib={between / 0.9 / 2**30}'
  refused, _ = _plan(memory)
  assert refused.returncode == errors.UsageError.exit_code
  line = refused.stderr.strip().splitlines()[-1]
  assert line.startswith('kldino: does not fit: vit_nano at batch 64 needs') and line.endswith(
      'set --config.model.remat=True (the activations are most of it)'), line
  fixed, plan = _plan(memory, '--config.model.remat=True')
  assert fixed.returncode == 0 and plan['fits'], fixed.stderr[-2000:]


def test_plan_of_a_tpu_names_the_vm_it_implies():
  result, plan = _plan('--config.hardware.memory_gib=64', '--config.hardware.name=v5p-8',
                       '--config.hardware.kind=tpu')
  assert result.returncode == 0, result.stderr[-2000:]
  assert plan['launch'] == ('python -m launch.tpu_vm --accelerator=v5p-8 (creates it with '
                            '--version=v2-alpha-tpuv5)')
