"""--mode=linear_eval end to end: DINO's linear evaluation of a workdir's teacher, several heads
at once, checkpointed: a kill -9 in the middle and a rerun give the uninterrupted JSON."""
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from configs.smoke import get_config as smoke_config
from kldino.modes import import_dino as import_mode
from kldino.tools.torch_models import VisionTransformer
from tests.helpers import run_kldino, signal_at_log_line, start_kldino

# 2 epochs of ceil(1347 / 64) = 22 steps on digits (the last of 3 rows); heads checkpointed every
# 5 steps, scored after each epoch.
OPTIONS = [
    '--config.eval.linear_epochs=2', '--config.eval.linear_batch_size=64',
    '--config.eval.linear_lrs=(0.1,1.0)', '--config.eval.n_last_blocks=2',
    '--config.checkpoint_every_steps=5', '--config.log_every_steps=5'
]
TOTAL_STEPS = 2 * math.ceil(1347 / 64)


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """A workdir whose step-0 checkpoint holds a random DINO-style ViT (no training needed)."""
  torch.manual_seed(0)
  model = VisionTransformer(16, 4, 1, 32, 2, 2)  # vit_nano/4 on 16x16 digits, as smoke.py
  path = str(tmp_path_factory.mktemp('pth') / 'vit.pth')
  torch.save(model.state_dict(), path)
  workdir = str(tmp_path_factory.mktemp('imported'))
  import_mode.run(smoke_config(), workdir, import_from=path)
  return workdir


def _args(workdir, *extra):
  return ['--mode=linear_eval', f'--workdir={workdir}', *OPTIONS, *extra]


def _run(workdir, *extra):
  return run_kldino(*_args(workdir, *extra))


def _head_steps(workdir):
  return sorted(
      int(os.path.basename(p))
      for p in glob.glob(os.path.join(workdir, 'linear_eval', 'step_0', 'checkpoints', '*'))
      if os.path.basename(p).isdigit())


@pytest.fixture(scope='module')
def uninterrupted(imported, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  shutil.copytree(imported, workdir, dirs_exist_ok=True)
  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_reports_every_head_and_the_best(uninterrupted):
  workdir, result = uninterrupted
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  with open(os.path.join(workdir, 'linear_eval.json')) as f:
    assert json.load(f) == printed
  assert [head['lr'] for head in printed['heads']] == [0.1, 1.0]
  best = max(printed['heads'], key=lambda head: head['top1'])
  assert (printed['linear_top1'], printed['linear_top5'],
          printed['linear_lr']) == (best['top1'], best['top5'], best['lr'])
  for head in printed['heads']:
    assert 0.0 <= head['top1'] <= head['top5'] <= 1.0
  # 44 steps on a random ViT's features: clearly above chance (0.1) on 10 classes.
  assert printed['linear_top1'] > 0.15
  # DINO's figure: the best top-1 over both epochs' scores and the heads; the last epoch's scores
  # are the heads' above.
  evaluations = printed['evaluations']
  assert [evaluation['epoch'] for evaluation in evaluations] == [1, 2]
  assert evaluations[-1]['top1'] == [head['top1'] for head in printed['heads']]
  scores = [(evaluation['top1'][h], evaluation['epoch'], lr)
            for evaluation in evaluations
            for h, lr in enumerate((0.1, 1.0))]
  assert (printed['best_top1'], printed['best_epoch'],
          printed['best_lr']) == max(scores, key=lambda score: score[0])
  assert printed['best_top1'] >= printed['linear_top1']
  assert 'linear_eval epoch 1/2: top-1' in result.stderr
  assert printed['step'] == 0 and printed['linear_steps'] == TOTAL_STEPS
  assert printed['feature_dim'] == 2 * 32 and printed['n_last_blocks'] == 2
  assert 'linear_eval step' in result.stderr and 'ETA' in result.stderr


def test_kill_9_and_rerun_give_the_same_json(imported, uninterrupted, tmp_path):
  workdir = str(tmp_path / 'killed')
  shutil.copytree(imported, workdir)
  process = start_kldino(*_args(workdir), stdout=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not any(5 <= step < TOTAL_STEPS for step in _head_steps(workdir)):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, 'no checkpoint of the heads appeared'
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not os.path.exists(os.path.join(workdir, 'linear_eval.json'))
  resumed = _run(workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming from step' in resumed.stderr
  with open(os.path.join(uninterrupted[0], 'linear_eval.json')) as f:
    expected = json.load(f)
  assert json.loads(resumed.stdout.strip().splitlines()[-1]) == expected


def test_other_protocol_values_are_refused_in_one_line(uninterrupted):
  workdir, _ = uninterrupted
  result = _run(workdir, '--config.eval.linear_lrs=(0.1,)')
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('kldino: ') and 'other eval.* values' in last and 'delete' in last


def test_heads_of_epochs_without_the_partial_batch_are_refused_in_one_line(uninterrupted, tmp_path):
  """Heads saved by a kldino that dropped the last partial batch (21 steps an epoch here, not
  22) cannot resume: one line saying so and to delete them."""
  workdir = str(tmp_path / 'dropped')
  shutil.copytree(uninterrupted[0], workdir)
  os.remove(os.path.join(workdir, 'linear_eval.json'))
  path = os.path.join(workdir, 'linear_eval', 'step_0', 'checkpoints', str(TOTAL_STEPS), 'meta',
                      'metadata')
  with open(path) as f:
    meta = json.load(f)
  meta.update(epoch=2, step_in_epoch=0, steps_per_epoch=1347 // 64)
  meta.pop('linear_evals')
  with open(path, 'w') as f:
    json.dump(meta, f)
  result = _run(workdir)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('kldino: ') and 'with 21 steps an epoch where this evaluation takes 22' \
      in last and 'delete' in last


def test_sigterm_while_scoring_exits_0_and_the_rerun_scores(uninterrupted, tmp_path):
  reference, _ = uninterrupted
  workdir = str(tmp_path / 'scoring')
  shutil.copytree(reference, workdir)
  os.remove(os.path.join(workdir, 'linear_eval.json'))  # the heads trained, not yet scored
  returncode, stdout, stderr = signal_at_log_line(
      _args(workdir), f'linear_eval: scoring the heads of step {TOTAL_STEPS}')
  assert returncode == 0, stderr[-3000:]
  assert 'stopped on request while scoring the linear heads; the heads are saved' in \
      stderr.strip().splitlines()[-1]
  assert not stdout.strip() and not os.path.exists(os.path.join(workdir, 'linear_eval.json'))
  rerun = _run(workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  with open(os.path.join(reference, 'linear_eval.json')) as f:
    assert json.loads(rerun.stdout.strip().splitlines()[-1]) == json.load(f)
