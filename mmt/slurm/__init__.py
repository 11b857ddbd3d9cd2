"""Slurm jobs for mmt: one sbatch template, rendered and submitted by `mmt slurm submit`.

`mmt.slurm.job` resolves configs and renders the script, `mmt.slurm.submit` writes and submits it, and
`mmt.slurm.scontrol` reads job state back (used by `mmt slurm wait` and the tests).
"""
