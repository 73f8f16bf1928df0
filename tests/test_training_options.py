"""One definition of each training option, of the importance-sampling checks and of a problem list's message."""

import typing
from dataclasses import fields

import pytest
import torch

from frugalm.errors import ConfigError, problems_message
from frugalm.recipe import option_docs
from frugalm.registry import TECHNIQUES, get_technique
from frugalm.techniques.training_stage import TrainingOptions
from frugalm.training.importance import ImportanceConfig, ImportanceWindows, sampling_problems
from frugalm.training.loop import LoopOptions, TrainConfig


def test_stage_options_are_the_loops_options_with_their_docs_and_types():
    loop_docs = {name: (tp, doc) for name, tp, _, doc in option_docs(LoopOptions)}
    training = [get_technique(n).config_cls for n in TECHNIQUES if get_technique(n).kind == "training"]
    assert training and all(issubclass(cls, TrainingOptions) for cls in training)
    for cls in (TrainingOptions, *training):
        docs = {name: (tp, doc) for name, tp, _, doc in option_docs(cls)}
        assert {name: docs[name] for name in loop_docs} == loop_docs, (
            f"{cls.__name__} restates a loop option's type or doc"
        )
    assert [f.name for f in fields(TrainConfig)] == [f.name for f in fields(LoopOptions)] + ["checkpoint_dir"]
    assert "checkpoint_dir" not in {
        f.name for f in fields(TrainingOptions)
    }  # set per stage by the run, not by the user
    hints = typing.get_type_hints(TrainingOptions)
    assert all(hints[f.name] == typing.get_type_hints(LoopOptions)[f.name] for f in fields(LoopOptions))


def test_importance_checks_name_the_options_as_written():
    assert sampling_problems(pool=("sampling_pool", 0), uniform_mix=("sampling_mix", 2.0)) == [
        "sampling_pool=0 must be >= 1", "sampling_mix=2.0 must be in [0, 1]"
    ]  # fmt: skip
    stage = TrainingOptions(sampling="importance", sampling_pool=0, sampling_power=float("nan"), rescore_every=0)
    assert [p.split("=")[0] for p in stage.problems()] == ["sampling_pool", "rescore_every", "sampling_power"]
    assert TrainingOptions(sampling_pool=0).problems() == []  # checked only when sampling by importance
    assert [p.split("=")[0] for p in ImportanceConfig(num_samples=0, batch_size=0).problems()] == [
        "num_samples",
        "batch_size",
    ]
    with pytest.raises(ConfigError, match=r"importance sampling: pool=0 must be >= 1; rescore_every=0") as info:
        ImportanceWindows(
            torch.nn.Linear(1, 1),
            torch.arange(100),
            batch_size=2,
            seq_len=8,
            pool=0,
            power=1.0,
            uniform_mix=0.1,
            rescore_every=0,
        )
    assert "num_samples" not in str(info.value)


def test_problems_message_is_one_line():
    assert problems_message("X", ["a", "b", "a"]) == "X: a; b. Fix these options."
    assert problems_message("X", ["did you mean 'y'?"]) == "X: did you mean 'y'? Fix these options."
    assert problems_message("r.yaml", ["one\ntwo"], closing="") == "r.yaml: one two"
