"""DINOv3's later phases on configs/smoke.py: a run with Gram anchoring (its Gram teacher at twice
the resolution, refreshed across the interruption) is the source of an `init_from` run at larger
crops, which loads the source exactly (its position table resized), starts a fresh optimizer at
step 0, and resumes bit-exactly from its own checkpoints after SIGTERM."""
import glob
import os
import signal
import time

import jax
import numpy as np
import pytest

from configs.smoke import get_config as smoke_config
from kldino.core import step as step_lib
from kldino.errors import ConfigError
from kldino.models import forward
from kldino.models.vit import resize_position_table
from kldino.train import Trainer
from tests.helpers import assert_states_equal, run_kldino, start_kldino

STEPS = 1347 // 32  # one epoch of the digits at batch 32
GRAM = {
    'num_epochs': 1,
    'gram.use': True,
    'gram.start_step': 5,
    'gram.refresh_every': 7,  # refreshes at steps 12, 19, 26, 33, 40: around the interruption
    'gram.ramp_steps': 10,
    'gram.teacher_resolution_scale': 2.0,
}
HIGH_RES = {'aug.global_size': 24, 'aug.local_size': 12}


def _config(overrides: dict):
  config = smoke_config()
  for key, value in overrides.items():
    parent, _, leaf = key.rpartition('.')
    (config[parent] if parent else config)[leaf] = value
  return config


def _args(workdir, overrides: dict):
  return ['--config=configs/smoke.py', f'--workdir={workdir}'
         ] + [f'--config.{key}={value}' for key, value in overrides.items()]


def _steps(workdir):
  return sorted(
      int(os.path.basename(p))
      for p in glob.glob(os.path.join(workdir, 'checkpoints', '*'))
      if os.path.basename(p).isdigit())


def _state(workdir, overrides: dict, step=None):
  return jax.device_get(Trainer(_config(overrides), workdir).restore_or_init(step=step))


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A finished run with Gram anchoring."""
  workdir = str(tmp_path_factory.mktemp('source'))
  run_kldino(*_args(workdir, GRAM), check=True)
  return workdir


def _high_res(source_dir):
  return {**GRAM, **HIGH_RES, 'init_from': source_dir}


def test_init_from_loads_the_source_exactly_with_a_fresh_optimizer(source, tmp_path):
  overrides = _high_res(source)
  trainer = Trainer(_config(overrides), str(tmp_path / 'new'))
  state = jax.device_get(trainer.restore_or_init())
  loaded = _state(source, GRAM, step=STEPS)
  fresh = jax.device_get(trainer.program.init(trainer.config.seed))
  assert int(state.step) == 0
  assert_states_equal((state.opt_state, state.norm_state, state.rng),
                      (fresh.opt_state, fresh.norm_state, fresh.rng))
  model = trainer.config.model
  for name in ('student', 'teacher', 'gram_teacher'):
    tree, expected = getattr(state, name), getattr(loaded, name)
    backbone = tree if name == 'gram_teacher' else tree['backbone']
    source_backbone = expected if name == 'gram_teacher' else expected['backbone']
    # The 4 x 4 position grid resized once to 6 x 6, as the ViT resizes it at run time.
    np.testing.assert_array_equal(
        backbone['pos_embed'],
        resize_position_table(source_backbone['pos_embed'], (6, 6),
                              interpolation=model.pos_interpolation))
    assert_states_equal({**backbone, 'pos_embed': 0}, {**source_backbone, 'pos_embed': 0})
    if name != 'gram_teacher':
      assert_states_equal({**tree, 'backbone': 0}, {**expected, 'backbone': 0})
  # So the loaded teacher computes at 24 px what the source's computes there.
  images = np.random.default_rng(0).standard_normal((3, 24, 24, 1)).astype(np.float32)
  source_graphdef, _ = step_lib.build_graphdef(_config(GRAM), 1)
  np.testing.assert_allclose(forward.patch_tokens(trainer.graphdef, state.teacher, images),
                             forward.patch_tokens(source_graphdef, loaded.teacher, images),
                             rtol=1e-5,
                             atol=1e-5)


def test_init_from_another_model_is_refused_in_one_line(source, tmp_path):
  overrides = {**_high_res(source), 'model.name': 'vit_micro'}
  with pytest.raises(ConfigError, match='init_from=.*vit_nano.*vit_micro') as error:
    Trainer(_config(overrides), str(tmp_path / 'other')).restore_or_init()
  assert '\n' not in str(error.value)
  overrides = {**_high_res(source), 'model.num_registers': 2}
  with pytest.raises(ConfigError, match='register_tokens with shape None'):
    Trainer(_config(overrides), str(tmp_path / 'registers')).restore_or_init()
  with pytest.raises(ConfigError, match='no checkpoint at step 7'):
    Trainer(_config({**GRAM, 'init_from': f'{source}:7'}), str(tmp_path / 'step')).restore_or_init()


def test_resuming_with_gram_switched_is_refused_in_one_line(source):
  with pytest.raises(ConfigError,
                     match=r'gram.use=True \(now False\).*--config.init_from') as error:
    Trainer(_config({**GRAM, 'gram.use': False}), source).restore_or_init()
  assert '\n' not in str(error.value)


def test_an_init_from_run_with_gram_resumes_bit_exactly_after_sigterm(source, tmp_path):
  overrides = _high_res(source)
  reference = str(tmp_path / 'uninterrupted')
  result = run_kldino(*_args(reference, overrides), check=True)
  assert ' | gram ' in result.stderr
  workdir = str(tmp_path / 'interrupted')
  process = start_kldino(*_args(workdir, overrides))
  deadline = time.time() + 400
  while not _steps(workdir):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  stopped_at = int(stderr.split('stopped at step ')[1].split()[0])
  assert stopped_at < STEPS
  result = run_kldino(*_args(workdir, overrides), check=True)
  assert f'resuming from the checkpoint at step {stopped_at}' in result.stderr
  final = _state(workdir, overrides, step=STEPS)
  assert_states_equal(final, _state(reference, overrides, step=STEPS))
  # It trained on from its own checkpoints: not the source's parameters any more.
  assert not np.array_equal(
      final.student['backbone']['patch_embed']['kernel'],
      _state(source, GRAM, step=STEPS).student['backbone']['patch_embed']['kernel'])
