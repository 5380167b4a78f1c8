"""launch/tpu_vm.py: the TPU VM's software version follows the accelerator. (Its dry run as a
command: tests/e2e/test_launch.py.)"""
import pytest

from launch import tpu_vm


@pytest.mark.parametrize('accelerator, version', [('v4-32', 'tpu-ubuntu2204-base'),
                                                  ('v5litepod-64', 'v2-alpha-tpuv5-lite'),
                                                  ('v5p-128', 'v2-alpha-tpuv5'),
                                                  ('v6e-256', 'v2-alpha-tpuv6e')])
def test_tpu_vm_software_version_follows_the_accelerator(accelerator, version):
  args = tpu_vm.parser().parse_args([
      '--name=v', '--zone=z', f'--accelerator={accelerator}', '--config=c.py', '--workdir=gs://b/w'
  ])
  assert f'--version={version}' in tpu_vm.commands(args)[0]
  args.version = 'my-image'
  assert '--version=my-image' in tpu_vm.commands(args)[0]
