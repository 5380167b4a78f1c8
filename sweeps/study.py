"""The normalisation study: the same backbone and data with every teacher normalisation
of docs/method.md, the prior period T, the paper's open prototype variants, and a range of
teacher temperatures. Base config: configs/study_digits.py (or any, e.g. an ImageNet one).

    python -m launch.sweep --sweep=sweeps/study.py --config=configs/study_digits.py \
        --workdir_root=studies/digits --report
"""


def get_sweep():
  prior = {'objective.normalization': 'prior', 'objective.prior_source': 'sweep'}
  return {
      'list': [
          {
              **prior, 'objective.prior_every_epochs': 1
          },
          {
              **prior, 'objective.prior_every_epochs': 2
          },
          {
              **prior, 'objective.prior_every_epochs': 3
          },
          {
              'objective.normalization': 'prior',
              'objective.prior_source': 'batch'
          },
          {
              'objective.normalization': 'prior',
              'objective.prior_source': 'ema'
          },
          {
              'objective.normalization': 'center'
          },
          {
              'objective.normalization': 'sinkhorn'
          },
          {
              'objective.normalization': 'teacher_bn'
          },
          {
              'objective.normalization': 'none'
          },
          {
              **prior, 'model.prototypes': 'fixed'
          },
          {
              **prior, 'model.prototypes': 'centered'
          },
          {
              **prior, 'objective.teacher_temp': 0.02,
              'objective.warmup_teacher_temp': 0.02
          },
          {
              **prior, 'objective.teacher_temp': 0.07,
              'objective.warmup_teacher_temp': 0.07
          },
          {
              **prior, 'objective.teacher_temp': 0.1,
              'objective.warmup_teacher_temp': 0.1
          },
          # Without batch statistics in the head (which resist collapse by themselves).
          {
              'objective.normalization': 'none',
              'model.head_norm': 'layer'
          },
          {
              **prior, 'model.head_norm': 'layer'
          },
      ]
  }
