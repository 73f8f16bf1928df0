"""frugalm validate RECIPE ...: check recipes without loading a model."""

from __future__ import annotations

from frugalm.cli.config_options import add_overrides_option


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="check recipes (every problem, located) without loading a model")
    p.add_argument("recipes", nargs="+", help="recipe YAML files")
    add_overrides_option(p)
    p.add_argument("--print", action="store_true", dest="show", help="print each resolved recipe")
    p.set_defaults(func=run)


def run(args) -> int:
    from frugalm.recipe import dump_recipe, load_recipe

    for path in args.recipes:
        recipe = load_recipe(path, args.overrides)
        print(f"{path}: ok ({len(recipe.stages)} stage(s): {', '.join(s.technique for s in recipe.stages)})")
        if args.show:
            print(dump_recipe(recipe))
    return 0
