"""frugalm run RECIPE [MODEL]: apply a recipe, save the variant, measure it against its base."""

from __future__ import annotations

import sys

from frugalm.cli.bench_options import add_bench_options, bench_config, print_result


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="apply a recipe's stages to a model, save the variant, measure and store it")
    p.add_argument("recipe", help="recipe YAML file (see recipes/ and `frugalm ls techniques`)")
    p.add_argument("model", nargs="?", help="model to start from (default: the recipe's `model`, else the built-in model)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE", help="override a recipe value, e.g. stages.0.bits=4 (repeatable)")
    p.add_argument("--out", help="artifact folder (default: ./frugalm-out/<recipe name>); an existing one is replaced only if frugalm wrote it")
    p.add_argument("--force", action="store_true", help="replace --out even if frugalm did not write it")
    p.add_argument("--no-measure", action="store_true", help="only produce and save the variant")
    add_bench_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from frugalm.cli.progress import ProgressLine
    from frugalm.recipe import dump_recipe, load_recipe
    from frugalm.run import RunConfig, run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"# resolved recipe\n{dump_recipe(recipe)}", file=sys.stderr)
    progress = ProgressLine(enabled=not args.quiet)
    config = RunConfig(out_dir=args.out, bench=bench_config(args), measure=not args.no_measure, force=args.force)
    try:
        result = run_recipe(recipe, args.model, config, store=args.store, progress=progress)
    finally:
        progress.close()
    print(f"variant saved to {result.artifact}", file=sys.stderr)
    if result.bench:
        print_result(args, result.bench)
    return 0
