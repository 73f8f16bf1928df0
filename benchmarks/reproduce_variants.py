"""Each saved variant of an optimize session, re-benchmarked under its stored protocol, against its stored ppl_tok.

    .venv/bin/python benchmarks/reproduce_variants.py STORE.db OPTIMIZE_OUT_DIR EVAL_TEXT

Loads every artifact kept in OPTIMIZE_OUT_DIR/variants afresh (a new measuring child, packed
weights rebuilt from the files) and prints its perplexity next to the one stored when it was
made; the two must be identical.
"""

import sys
from pathlib import Path

from frugalm.benchmark.api import BenchConfig, bench
from frugalm.measure.quality import PerplexityProtocol
from frugalm.store import Store

db, out, data = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
with Store(db) as store:
    runs = {
        Path(r.model_path).name: (r, next(m.value for m in store.measurements(r.id) if m.metric == "ppl_tok"))
        for r in store.runs()
        if r.kind == "variant" and r.status == "complete"
    }
different = 0
for folder in sorted((out / "variants").iterdir()):
    run, stored = runs[folder.name]
    config = BenchConfig(
        data=data, workloads=("chat",), metrics=("ppl_tok",), protocol=PerplexityProtocol(**run.config["protocol"])
    )
    again = next(
        m.value
        for m in bench(folder, config, store=Path(db).with_suffix(".reproduce.db")).measurements
        if m.metric == "ppl_tok"
    )
    different += again != stored
    print(
        f"{folder.name:<12} stored {stored!r:<20} reloaded {again!r:<20} {'identical' if again == stored else 'DIFFERENT'}"
    )
sys.exit(1 if different else 0)
