"""Training: the job's story (job.py) and what it runs: the Lightning module, checkpoints and
resume, stops, distributed hosts, the best epoch, the epoch log, warm start.

May import: evaluation, data, model, and the package's root modules. Nothing imports it but the
`train` entry (cli.py) and the benchmarks.
"""
