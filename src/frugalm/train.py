"""Kept for existing callers: the training loop now lives in `frugalm.training.loop`."""

from frugalm.training.loop import (  # noqa: F401
    BatchFn,
    TrainConfig,
    TrainResult,
    causal_lm_loss,
    check_config,
    lr_at,
    make_optimizer,
    random_windows,
    train,
    train_causal_lm,
)
