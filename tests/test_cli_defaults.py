"""Each default is defined once, in the API's config dataclasses: the command line states and runs the same.

`frugalm bench`, `run` and `optimize` with no options build exactly the config their Python
call uses by default, and every default an option's help states is the dataclass's.
"""

import argparse
import dataclasses

import pytest

from frugalm.benchmark.api import BenchConfig
from frugalm.cli import bench as bench_cli
from frugalm.cli import build_parser
from frugalm.cli import optimize as optimize_cli
from frugalm.cli import run as run_cli
from frugalm.cli.bench_options import BENCH_OPTIONS
from frugalm.cli.config_options import _show
from frugalm.optimize import OptimizeConfig
from frugalm.run import RunConfig

# command: (the least it needs on the command line, its module, the API's default config, its own options)
COMMANDS = {
    "bench": ([], bench_cli, BenchConfig(), bench_cli.OPTIONS),
    "run": (
        ["recipe.yaml"],
        run_cli,
        RunConfig(),
        [*run_cli.OPTIONS, *(dataclasses.replace(o, field=f"bench.{o.field}") for o in BENCH_OPTIONS)],
    ),
    "optimize": (
        [],
        optimize_cli,
        OptimizeConfig(),
        [*optimize_cli.OPTIONS, *(dataclasses.replace(o, field=f"bench.{o.field}") for o in BENCH_OPTIONS)],
    ),
}


def _parse(command: str, *args: str):
    return build_parser().parse_args([command, *COMMANDS[command][0], *args])


def _subparser(command: str) -> argparse.ArgumentParser:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[command]


def _get(config, path: str):
    for part in path.split("."):
        config = getattr(config, part)
    return config


@pytest.mark.parametrize("command", COMMANDS)
def test_the_command_line_runs_the_apis_default_config(command):
    _, module, api_default, _ = COMMANDS[command]
    assert module.config(_parse(command)) == api_default


@pytest.mark.parametrize("command", COMMANDS)
def test_every_default_the_help_states_is_the_apis(command):
    _, _, api_default, options = COMMANDS[command]
    actions = {a.option_strings[0]: a for a in _subparser(command)._actions if a.option_strings}
    for option in options:
        real = _get(api_default, option.field)
        help_text = actions[option.flag].help.replace("%%", "%")
        assert help_text and not help_text.startswith(" ("), f"{command} {option.flag}: its field has no docstring"
        if _show(real):
            assert help_text.endswith(f"default: {_show(real)})"), (command, option.flag, help_text, real)
        else:
            last_note = help_text.rsplit("(", 1)[-1]  # a doc may say what None means; no value is stated for it
            assert not last_note.startswith("default: ") and "; default: " not in last_note, (
                command,
                option.flag,
                help_text,
            )


def test_optimize_measures_with_its_own_protocol_from_both_sides():
    config = optimize_cli.config(_parse("optimize"))
    assert (
        config.bench == OptimizeConfig().bench
        and config.bench.protocol.robust_tokens == OptimizeConfig().bench.protocol.robust_tokens
    )
    assert (config.bench.repetitions, config.bench.protocol.max_tokens) != (
        BenchConfig().repetitions,
        BenchConfig().protocol.max_tokens,
    )  # lighter than bench


def test_given_options_replace_only_what_they_name():
    config = optimize_cli.config(
        _parse(
            "optimize",
            "--eval-tokens",
            "100",
            "--workload",
            "chat",
            "--repetitions",
            "2",
            "--force",
            "--constraint",
            "ppl_tok<=+1%",
        )
    )
    default = OptimizeConfig()
    assert config.bench.protocol == dataclasses.replace(default.bench.protocol, max_tokens=100)
    assert config.bench == dataclasses.replace(
        default.bench, protocol=config.bench.protocol, workloads=("chat",), repetitions=2
    )
    assert config == dataclasses.replace(default, bench=config.bench, force=True, constraints=("ppl_tok<=+1%",))
    assert bench_cli.config(_parse("bench", "--reference", "ref", "--scale-workloads")) == BenchConfig(
        reference="ref", scale_workloads=True
    )
    assert run_cli.config(_parse("run", "--no-measure", "--out", "o")) == RunConfig(out_dir="o", measure=False)
