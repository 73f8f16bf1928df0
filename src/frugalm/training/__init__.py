"""Training: the one seeded loop every training stage runs (loop.py), its atomic checkpoints
(checkpoint.py), where training text comes from (text.py), and data-parallel training
(distributed.py).

Import the modules you need (`from frugalm.training.loop import train`); this package imports
nothing itself, so `import frugalm` stays cheap.
"""
