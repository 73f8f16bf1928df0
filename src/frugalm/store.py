"""The results store: SQLite with named, append-only migrations.

A run and all its measurements are written in one transaction, so a run is either complete in
the store or absent; a crash, a SIGKILL or a power cut in the middle leaves the database as it
was (SQLite's journal guarantees it). A run whose measuring child failed is stored with status
'failed' and its error, and no measurements.

Migrations are never edited once shipped: a schema change is a new, named migration appended to
MIGRATIONS. The table `_migrations` records which ones a database has.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from frugalm.errors import ConfigError, MeasurementError
from frugalm.measure.metrics import Measurement

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_runs_and_measurements",
        """
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('complete', 'failed')),
            created_at TEXT NOT NULL,
            wall_s REAL,
            model_ref TEXT NOT NULL,
            model_path TEXT,
            benchmark_version TEXT NOT NULL,
            config_json TEXT NOT NULL,
            environment_json TEXT NOT NULL,
            error TEXT
        );
        CREATE TABLE measurements (
            run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            metric TEXT NOT NULL,
            workload TEXT NOT NULL DEFAULT '',
            value REAL NOT NULL,
            unit TEXT NOT NULL,
            method TEXT NOT NULL CHECK (method IN ('measured', 'estimated', 'counted')),
            n INTEGER NOT NULL,
            spread REAL,
            protocol_json TEXT NOT NULL,
            samples_json TEXT,
            PRIMARY KEY (run_id, metric, workload)
        );
        CREATE INDEX runs_created ON runs(created_at);
        """,
    ),
    (
        "0002_runs_key",
        """
        ALTER TABLE runs ADD COLUMN key TEXT;
        CREATE INDEX runs_key ON runs(key, status);
        """,
    ),
    (
        "0003_reference_scores",
        """
        CREATE TABLE reference_scores (
            key TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            scores_json TEXT NOT NULL
        );
        """,
    ),
]


def default_store_path() -> Path:
    """FRUGALM_STORE, else $XDG_DATA_HOME/frugalm/frugalm.db (~/.local/share/frugalm/frugalm.db)."""
    if os.environ.get("FRUGALM_STORE"):
        return Path(os.environ["FRUGALM_STORE"]).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME", "~/.local/share")).expanduser()
    return base / "frugalm" / "frugalm.db"


@dataclass
class Run:
    model_ref: str
    benchmark_version: str
    config: dict
    environment: dict
    kind: str = "bench"
    status: str = "complete"
    model_path: str | None = None
    wall_s: float | None = None
    error: str | None = None
    key: str | None = None
    """Identity of what was measured under which settings (optimize uses it to resume)."""
    id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3))
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))


class Store:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path).expanduser() if path else default_store_path()
        if self.path.exists() and self.path.is_dir():
            raise ConfigError(
                f"results store '{self.path}' is a folder; pass a file path for the SQLite database with --store"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"results store '{self.path}' cannot be opened ({exc}); pass a writable path with --store or FRUGALM_STORE"
            ) from None
        self.db.row_factory = sqlite3.Row
        self._check_is_database()
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.migrate()

    def _check_is_database(self) -> None:
        """Refuse, with the file untouched, a path that holds something other than a SQLite database.

        connect() reads nothing; the first query reads the file's header and fails on any other
        file (a text file, say) before writing anything. A read-only query, so nothing is created.
        """
        try:
            self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:  # OperationalError (locked, unreadable) included
            self.db.close()
            if getattr(exc, "sqlite_errorname", None) == "SQLITE_NOTADB" or "not a database" in str(exc):
                what = "is not a SQLite database"
            else:
                what = "cannot be read as a SQLite database"
            raise ConfigError(
                f"results store '{self.path}' {what} ({exc}); it was left untouched: pass another path with --store (or FRUGALM_STORE), or move that file away"
            ) from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def migrate(self) -> list[str]:
        """Apply the migrations this database lacks, each in its own transaction; return their names."""
        self.db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        done = {r["name"] for r in self.db.execute("SELECT name FROM _migrations")}
        applied = []
        for name, sql in MIGRATIONS:
            if name in done:
                continue
            with self._transaction():
                for statement in filter(str.strip, sql.split(";")):
                    self.db.execute(statement)
                self.db.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.strftime("%Y-%m-%dT%H:%M:%S%z")))
            applied.append(name)
        return applied

    def _transaction(self):
        return _Transaction(self.db)

    def add_run(self, run: Run, measurements: list[Measurement]) -> str:
        """Store a run and its measurements atomically; return the run id.

        A NaN or infinite figure means the model or its measurement broke: the run is then stored
        as failed with the figures named (and none of them), and MeasurementError is raised.
        """
        bad = [m for m in measurements if not math.isfinite(float(m.value))]
        if bad:
            run.status = "failed"
            run.error = (
                "non-finite figures: "
                + ", ".join(f"{m.metric}{f' ({m.workload})' if m.workload else ''} = {m.value}" for m in bad[:5])
                + (
                    "; the model's outputs are not finite (NaN or overflowing weights or activations): check the stages that produced it, or measure in float32"
                )
            )
            measurements = []
        with self._transaction():
            self.db.execute(
                "INSERT INTO runs (id, kind, status, created_at, wall_s, model_ref, model_path, benchmark_version,"
                " config_json, environment_json, error, key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    run.id,
                    run.kind,
                    run.status,
                    run.created_at,
                    run.wall_s,
                    run.model_ref,
                    run.model_path,
                    run.benchmark_version,
                    json.dumps(run.config),
                    json.dumps(run.environment),
                    run.error,
                    run.key,
                ),
            )
            self.db.executemany(
                "INSERT INTO measurements VALUES (?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        run.id,
                        m.metric,
                        m.workload or "",
                        float(m.value),
                        m.unit,
                        m.method,
                        m.n,
                        m.spread,
                        json.dumps(m.protocol),
                        json.dumps(m.samples) if m.samples is not None else None,
                    )
                    for m in measurements
                ],
            )
        if bad:
            raise MeasurementError(f"run {run.id} ({run.model_ref}) stored as failed: {run.error}")
        return run.id

    def runs(self, limit: int | None = None) -> list[Run]:
        sql = "SELECT * FROM runs ORDER BY created_at DESC, id DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [_run_from_row(r) for r in self.db.execute(sql)]

    def get_run(self, run_id: str) -> Run:
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise ConfigError(f"no run '{run_id}' in the store '{self.path}'; list the runs with `frugalm ls runs`")
        return _run_from_row(row)

    def complete_run_with_key(self, key: str) -> Run | None:
        """The newest complete run stored under `key`, if any."""
        row = self.db.execute(
            "SELECT * FROM runs WHERE key = ? AND status = 'complete' ORDER BY created_at DESC, id DESC LIMIT 1", (key,)
        ).fetchone()
        return _run_from_row(row) if row else None

    def measurements(self, run_id: str) -> list[Measurement]:
        """The run's figures as they were written: not checked against today's METRICS, so a figure
        whose metric or unit a later benchmark version renamed still reads."""
        rows = self.db.execute("SELECT * FROM measurements WHERE run_id = ? ORDER BY rowid", (run_id,))
        return [
            Measurement.stored(
                r["metric"],
                r["value"],
                r["unit"],
                r["method"],
                r["workload"] or None,
                r["n"],
                r["spread"],
                json.loads(r["protocol_json"]),
                json.loads(r["samples_json"]) if r["samples_json"] else None,
            )
            for r in rows
        ]

    def reference_scores(self, key: str) -> list[float] | None:
        """A reference model's item scores stored under `key` (see benchmark/api's reference_score_keys)."""
        row = self.db.execute("SELECT scores_json FROM reference_scores WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def add_reference_scores(self, key: str, scores: list[float]) -> None:
        """Keep a reference's item scores for later runs; a key already stored keeps its first scores."""
        with self._transaction():
            self.db.execute(
                "INSERT OR IGNORE INTO reference_scores VALUES (?,?,?)",
                (key, time.strftime("%Y-%m-%dT%H:%M:%S%z"), json.dumps(scores)),
            )

    def integrity_check(self) -> str:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (autocommit connection)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *exc):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


def _run_from_row(r: sqlite3.Row) -> Run:
    return Run(
        id=r["id"],
        kind=r["kind"],
        status=r["status"],
        created_at=r["created_at"],
        wall_s=r["wall_s"],
        model_ref=r["model_ref"],
        model_path=r["model_path"],
        benchmark_version=r["benchmark_version"],
        config=json.loads(r["config_json"]),
        environment=json.loads(r["environment_json"]),
        error=r["error"],
        key=r["key"],
    )
