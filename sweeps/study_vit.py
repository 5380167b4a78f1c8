"""The study of docs/method.md's claims on the digits ViT recipe (configs/study_digits_vit.py),
with seeds: every normalisation with 3 seeds; the prior period T and the LayerNorm head with 2;
the teacher temperature with 1; and, with seed 0, what would tell why Sinkhorn ends uniform on
this recipe (a 4x batch, DINO's head without batch norm, 64 prototypes, one and ten Sinkhorn
iterations, a warmer teacher). Seed 0 runs first, with the Sinkhorn probes right after Sinkhorn
and the LayerNorm heads before the prior periods, so that a study stopped part-way can already
say why Sinkhorn and the LayerNorm head behave as they do; then seeds 1 and 2. launch.sweep
resumes a study, and skips the runs already recorded in its runs.json (kldino/tools/report.py).

    python -m launch.sweep --sweep=sweeps/study_vit.py --config=configs/study_digits_vit.py \
        --workdir_root=studies/digits_vit --report
"""
PRIOR = {'objective.normalization': 'prior', 'objective.prior_source': 'sweep'}
SINKHORN = {'objective.normalization': 'sinkhorn'}
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
    SINKHORN,
    {
        'objective.normalization': 'teacher_bn'
    },
    {
        'objective.normalization': 'none'
    },
]
# The LayerNorm heads first (what they show needs explaining), then the prior periods.
HEADS_AND_PERIODS = [
    {
        **PRIOR, 'model.head_norm': 'layer'
    },
    {
        'objective.normalization': 'none',
        'model.head_norm': 'layer'
    },
    {
        **PRIOR, 'objective.prior_every_epochs': 16
    },
    {
        **PRIOR, 'objective.prior_every_epochs': 4
    },
]
# 0.04 is the default: the PRIOR runs above.
TEMPERATURES = [{
    **PRIOR, 'objective.teacher_temp': temp,
    'objective.warmup_teacher_temp': temp
} for temp in (0.02, 0.07, 0.1)]

# In the order of what they discriminate: whether the batch holds fewer teacher rows than
# prototypes (128 < K = 256), the head's batch norm, whether K exceeds the clusters the data
# fills (the prior passes find 80-90 % of the 256 empty by epoch 5), one Sinkhorn iteration (close
# to the batch prior without its floor of objective.prior_eps), then ten, and a warmer teacher.
SINKHORN_PROBES = [
    {
        **SINKHORN, 'batch_size': 256
    },
    {
        **SINKHORN, 'model.head_norm': 'none'
    },
    {
        **SINKHORN, 'model.num_prototypes': 64
    },
    {
        **SINKHORN, 'objective.sinkhorn_iters': 1
    },
    {
        **SINKHORN, 'objective.sinkhorn_iters': 10
    },
    {
        **SINKHORN, 'objective.teacher_temp': 0.07,
        'objective.warmup_teacher_temp': 0.07
    },
]


def get_sweep():
  after_sinkhorn = NORMALISATIONS.index(SINKHORN) + 1
  seed_0 = (NORMALISATIONS[:after_sinkhorn] + SINKHORN_PROBES + NORMALISATIONS[after_sinkhorn:] +
            HEADS_AND_PERIODS + TEMPERATURES)
  points = [{**point, 'seed': 0} for point in seed_0]
  points += [{**point, 'seed': 1} for point in NORMALISATIONS + HEADS_AND_PERIODS]
  points += [{**point, 'seed': 2} for point in NORMALISATIONS]
  return {'list': points}
