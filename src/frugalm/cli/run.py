"""frugalm run RECIPE [MODEL]: apply a recipe, save the variant, measure it against its base."""

from __future__ import annotations

import sys

from frugalm.cli.bench_options import add_bench_options, bench_config, print_result
from frugalm.cli.config_options import Option, add_options, add_overrides_option, configure

RUN = ("frugalm.run", "RunConfig")
OPTIONS = [
    Option("--out", "out_dir", {"metavar": "DIR"}, "an existing one is replaced only if frugalm wrote it"),
    Option("--force", "force", {"action": "store_true"}),
]


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="apply a recipe's stages to a model, save the variant, measure and store it")
    p.add_argument("recipe", help="recipe YAML file (see recipes/ and `frugalm ls techniques`)")
    p.add_argument(
        "model", nargs="?", help="model to start from (default: the recipe's `model`, else the built-in model)"
    )
    add_overrides_option(p)
    add_options(p, OPTIONS, *RUN)
    p.add_argument("--no-measure", action="store_true", help="only produce and save the variant")
    add_bench_options(p, owner=(*RUN, "bench"))
    p.set_defaults(func=run)


def config(args):
    """What `run_recipe()` does by default (RunConfig()), with the options given."""
    from dataclasses import replace

    from frugalm.run import RunConfig

    base = configure(RunConfig(), OPTIONS, args)
    return replace(base, bench=bench_config(args, base.bench), measure=base.measure and not args.no_measure)


def run(args) -> int:
    from frugalm.cli.progress import ProgressLine
    from frugalm.recipe import dump_recipe, load_recipe
    from frugalm.run import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"# resolved recipe\n{dump_recipe(recipe)}", file=sys.stderr)
    progress = ProgressLine(enabled=not args.quiet)
    try:
        result = run_recipe(recipe, args.model, config(args), store=args.store, progress=progress)
    finally:
        progress.close()
    print(f"variant saved to {result.artifact}", file=sys.stderr)
    if result.bench:
        print_result(args, result.bench)
    return 0
