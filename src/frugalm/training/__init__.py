"""Training: the one seeded loop every training stage runs and the options it takes (loop.py), the
account of what a run cost across resumes (accounting.py), its atomic checkpoints (checkpoint.py),
importance sampling of training windows (importance.py), and data-parallel training
(distributed.py, ddp_train.py).

Import the modules you need (`from frugalm.training.loop import train`); this package imports
nothing itself, so `import frugalm` stays cheap.
"""
