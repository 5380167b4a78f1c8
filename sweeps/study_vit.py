"""The study of docs/method.md's claims on the digits ViT recipe (configs/study_digits_vit.py),
with seeds: every normalisation with 3 seeds; the prior period T and the LayerNorm head with 2;
the teacher temperature with 1; then, with seed 0, what would tell why Sinkhorn ends uniform on
this recipe (more Sinkhorn iterations, a warmer teacher, a 4x batch, DINO's head without batch
norm). The points are ordered seed by seed, so that a study stopped
part-way has every setting at the lower seeds; launch.sweep resumes it, and skips the runs
already recorded in the study's runs.json (kldino/report.py).

    python -m launch.sweep --sweep=sweeps/study_vit.py --config=configs/study_digits_vit.py \
        --workdir_root=studies/digits_vit --report
"""
PRIOR = {'objective.normalization': 'prior', 'objective.prior_source': 'sweep'}
NORMALISATIONS = [
    PRIOR,
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
]
PERIODS_AND_HEADS = [
    {
        **PRIOR, 'objective.prior_every_epochs': 4
    },
    {
        **PRIOR, 'objective.prior_every_epochs': 16
    },
    {
        'objective.normalization': 'none',
        'model.head_norm': 'layer'
    },
    {
        **PRIOR, 'model.head_norm': 'layer'
    },
]
# 0.04 is the default: the PRIOR runs above.
TEMPERATURES = [{
    **PRIOR, 'objective.teacher_temp': temp,
    'objective.warmup_teacher_temp': temp
} for temp in (0.02, 0.07, 0.1)]

SINKHORN = {'objective.normalization': 'sinkhorn'}
SINKHORN_PROBES = [
    {
        **SINKHORN, 'objective.sinkhorn_iters': 10
    },
    {
        **SINKHORN, 'objective.teacher_temp': 0.07,
        'objective.warmup_teacher_temp': 0.07
    },
    {
        **SINKHORN, 'batch_size': 256
    },
    {
        **SINKHORN, 'model.head_norm': 'none'
    },
]


def get_sweep():
  points = []
  for seed in range(3):
    settings = NORMALISATIONS + (PERIODS_AND_HEADS if seed < 2 else []) + (TEMPERATURES
                                                                           if seed < 1 else [])
    points += [{**point, 'seed': seed} for point in settings]
  points += [{**point, 'seed': 0} for point in SINKHORN_PROBES]
  return {'list': points}
