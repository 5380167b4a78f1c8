"""`python -m kldino.bench` as a command: the input preset reads a config's data, and a baseline it
cannot build is refused before anything compiles."""
import json

from tests.helpers import run_kldino


def _bench(*flags):
  return run_kldino(*flags, module='kldino.bench', env={'JAX_PLATFORMS': 'cpu'})


def test_input_preset_reads_the_configs_data(tmp_path):
  """--preset=input --config=CONFIG [--config.KEY=VALUE]: the training input of that config, its
  results in the last line as JSON; --config goes with --preset=input only."""
  result = _bench('--preset=input', '--config=configs/digits.py',
                  f'--config.data.data_dir={tmp_path}', '--config.batch_size=16', '--steps=2',
                  '--json')
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(result.stdout.strip().splitlines()[-1])
  assert (results['preset'], results['dataset'], results['batch_size']) == ('input', 'digits', 16)
  assert results['crops'] == '2x16 + 6x8' and results['train_examples'] == 1347
  assert results['input_images_per_sec'] > 0 and results['input_cpu_ms_per_image'] > 0
  for flags in (['--preset=input'], ['--preset=tiny32', '--config=configs/digits.py']):
    usage = _bench(*flags)
    assert usage.returncode != 0
    assert '--config is what --preset=input measures' in usage.stderr


def test_a_baseline_it_cannot_build_is_refused_before_compiling():
  """--baseline takes 'torch', with a model preset whose step the PyTorch baseline builds: the
  digits config's head has batch norm, which it names in one line before anything compiles."""
  for flags, message in (
      (['--preset=tiny32', '--baseline=jax'], "the baseline is 'torch'"),
      (['--preset=input', '--config=configs/digits.py',
        '--baseline=torch'], '--baseline compares train steps'),
      (['--preset=digits', '--baseline=torch'], "model.head_norm='batch'"),
  ):
    usage = _bench(*flags)
    assert usage.returncode != 0 and message in usage.stderr, usage.stderr[-2000:]
    assert 'Traceback' not in usage.stderr and 'Compiling' not in usage.stderr
