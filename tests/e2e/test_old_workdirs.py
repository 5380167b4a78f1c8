"""Workdirs written by earlier kldino are read by today's (kldino/config/workdir.py, UPGRADES).

tests/fixtures/old_workdirs/DATE_COMMIT.tar.xz: configs/smoke.py trained for one epoch by the code
of that commit (a final checkpoint, config.json, and the eval.json that code computed). Today's
kldino evaluates and exports each to what it computed then, resumes those whose train state it
can train on, and refuses the others in one line that says which kldino wrote them.
"""
import glob
import json
import os
import tarfile

import numpy as np
import pytest

from kldino import train
from kldino.config import workdir as workdir_config
from kldino.errors import ConfigError
from kldino.modes import eval as eval_mode
from kldino.modes import export as export_mode
from kldino.run import Run
from tests.helpers import REPO

ARCHIVES = sorted(glob.glob(os.path.join(REPO, 'tests', 'fixtures', 'old_workdirs', '*.tar.xz')))
STEP = 42  # one epoch of the digits at batch 32


@pytest.fixture(params=ARCHIVES, ids=lambda path: os.path.basename(path)[:-len('.tar.xz')])
def old_workdir(request, tmp_path):
  with tarfile.open(request.param) as archive:
    # The archives are the repository's own; Python before 3.11.4 has no extraction filters.
    safe = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
    archive.extractall(tmp_path, **safe)
  (workdir,) = glob.glob(str(tmp_path / '*'))
  with open(os.path.join(workdir, 'eval.json')) as f:
    trained = json.load(f)
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  return workdir, saved, trained


def test_there_is_a_workdir_of_each_era():
  assert len(ARCHIVES) >= 5


def test_eval_and_export_give_what_the_old_code_computed(old_workdir, tmp_path):
  workdir, saved, trained = old_workdir
  config = workdir_config.get_config(workdir)
  results = eval_mode.run(config, workdir, step=None, output=str(tmp_path / 'eval.json'))
  assert results['step'] == trained['step'] == STEP
  if 'eval_resize' in saved['data']:  # today's evaluation view: the same numbers
    assert (results['knn_top1'], results['linear_top1']) == (trained['knn_top1'],
                                                             trained['linear_top1'])
    # Sums over 8 simulated devices here, over 1 when they were written: float rounding.
    for key in ('cluster_mi', 'effective_clusters'):
      assert results[key] == pytest.approx(trained[key], rel=1e-5), key
  else:  # the whole image resized to 16, which the old code also rounded to uint8
    assert abs(results['knn_top1'] - trained['knn_top1']) <= 2 / 450 + 1e-9
    assert abs(results['linear_top1'] - trained['linear_top1']) <= 2 / 450 + 1e-9
    assert results['cluster_mi'] == pytest.approx(trained['cluster_mi'], abs=5e-3)
  exported = export_mode.run(config, workdir, step=None, output=str(tmp_path / 'backbone.npz'))
  _, meta = export_mode.load_backbone(exported['export'])
  assert meta['step'] == STEP and meta['model']['name'] == 'vit_nano'
  teacher, _ = Run(config, workdir).restore_teacher()
  with np.load(exported['export']) as arrays:
    np.testing.assert_array_equal(
        arrays['blocks/0/attn/qkv/kernel'],
        np.asarray(teacher['backbone']['blocks'][0]['attn']['qkv']['kernel']))


def test_training_resumes_or_refuses_in_one_line(old_workdir):
  workdir, saved, _ = old_workdir
  config = workdir_config.get_config(workdir)
  config.num_epochs = 2
  refusal = workdir_config.resume_refusal(saved)
  if refusal is not None:
    with pytest.raises(ConfigError,
                       match='cannot be resumed: it was written by a kldino from '
                       'before 2026-11-30') as error:
      train.train_and_evaluate(config, workdir)
    assert '\n' not in str(error.value) and '--mode=eval' in str(error.value)
    return
  results = train.train_and_evaluate(config, workdir)
  assert results['step'] == 2 * STEP and np.isfinite(results['knn_top1'])
