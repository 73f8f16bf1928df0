"""frugalm report [SESSION]: regenerate the report of an optimize session from the store."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="regenerate an optimize report (HTML, Markdown, JSON) from the store")
    p.add_argument("session", nargs="?", help="optimize session id (default: the latest; see `frugalm ls runs`)")
    p.add_argument(
        "-o", "--output", default="frugalm-report.html", help="HTML file to write; .md and .json are written beside it"
    )
    p.add_argument("--store", help="SQLite results store")
    p.add_argument(
        "--utility",
        action="append",
        default=[],
        metavar="RESOURCE=POINTS",
        help="exchange rate of the utility ranking (points of quality per halving of the resource), repeatable; "
        "default: the session's rates, else report/utility.py's",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from frugalm.errors import ConfigError
    from frugalm.report.build import build_report_data, render_all
    from frugalm.report.utility import parse_rates
    from frugalm.store import Store

    with Store(args.store) as db:
        if args.session:
            session = db.get_run(args.session)
        else:
            session = next((r for r in db.runs() if r.kind == "optimize"), None)
        if session is None or session.kind != "optimize":
            raise ConfigError(
                f"no optimize session {'named ' + repr(args.session) + ' ' if args.session else ''}in the store; run `frugalm optimize` first, or pick one from `frugalm ls runs`"
            )
        rates = parse_rates([*(session.config.get("utility") or ()), *args.utility])
        data = build_report_data(db, session, rates)
    out = Path(args.output)
    if out.is_dir():
        raise ConfigError(f"output '{out}' is a folder; pass a file name like report.html")
    for path in render_all(data, out.with_suffix("")).values():
        print(path)
    return 0
