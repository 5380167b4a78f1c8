"""launch/sweep.py: a grid or a list expands to named jobs. (The runners' commands and the local
runner end to end: tests/e2e/test_launch.py.)"""
import pytest

from launch import sweep


def test_sweep_grid_and_list_expand_to_named_jobs():
  grid = {
      'grid': {
          'objective.prior_every_epochs': [1, 5],
          'seed': [0, 1]
      },
      'fixed': {
          'num_epochs': 3
      }
  }
  jobs = sweep.jobs(grid, '/r')
  assert [job.name for job in jobs] == [
      'prior_every_epochs-1_seed-0', 'prior_every_epochs-1_seed-1', 'prior_every_epochs-5_seed-0',
      'prior_every_epochs-5_seed-1'
  ]
  assert jobs[2] == sweep.Job('prior_every_epochs-5_seed-0', '/r/prior_every_epochs-5_seed-0',
                              ('num_epochs=3', 'objective.prior_every_epochs=5', 'seed=0'))
  listed = sweep.jobs({'list': [{
      'aug.global_scale': (0.5, 1.0)
  }, {
      'model.name': 'vit_nano'
  }]}, '/r')
  assert [job.overrides for job in listed] == [('aug.global_scale=(0.5,1.0)',),
                                               ('model.name=vit_nano',)]
  with pytest.raises(ValueError, match="exactly one of 'grid' or 'list'"):
    sweep.jobs({'grid': {}, 'list': []}, '/r')
  with pytest.raises(ValueError, match='both named seed-0'):
    sweep.jobs({'list': [{'seed': 0}, {'seed': 0}]}, '/r')
