"""The collapse guard in the loop (kldino/core/guard.py's wiring): stop saves, exits 6 and is not
undone by a rerun; warn trains on and keeps the record."""
import json

from kldino import errors
from tests.helpers import config_module, run_kldino


def _main(workdir, *overrides):
  return run_kldino('--config=configs/smoke.py',
                    f'--workdir={workdir}',
                    '--config.guard.min_clusters=1000',
                    '--config.guard.patience_epochs=1',
                    *overrides,
                    env={'JAX_PLATFORMS': 'cpu'})


def test_stop_saves_exits_6_and_a_rerun_does_not_train_on(tmp_path):
  """min_clusters above K makes every step 'one cluster': with the smoke config's 42 steps an
  epoch and a log every 10, the run of collapsed steps starts at step 10 and has lasted an epoch
  at step 60."""
  from kldino.run import Run  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / 'run'
  result = _main(workdir, '--config.guard.collapse=stop')
  assert result.returncode == errors.CollapseStopped.exit_code, result.stderr[-2000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith('kldino: one-cluster collapse at step 60, every logged step since '
                         'step 10') and 'checkpoint of step 60 saved' in line, line
  assert 'Traceback' not in result.stderr
  record = json.loads((workdir / 'eval.json').read_text())
  assert record['collapse']['kind'] == 'one_cluster' and record['step'] == 60
  assert Run(config_module('smoke').get_config(), str(workdir)).checkpointer.latest_step() == 60
  again = _main(workdir, '--config.guard.collapse=stop')
  assert again.returncode == errors.CollapseStopped.exit_code
  assert 'stopped collapsed at step 60' in again.stderr.strip().splitlines()[-1]
  # warn trains on to the end, evaluates, and keeps the record of the collapse.
  resumed = _main(workdir, '--config.guard.collapse=warn')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  final = json.loads((workdir / 'eval.json').read_text())
  assert final['step'] == 2 * 42 and 'knn_top1' in final
  assert final['collapse'] == record['collapse']
