"""Launchers: TPU VM pods (tpu_vm.py), SLURM multi-GPU hosts (slurm.py), config sweeps (sweep.py).

Each builds its commands as data (pure functions, tested exactly) and either prints them
(--dry_run) or runs them.
"""
