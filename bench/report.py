"""Billing report speed on SQLite: 1,000,000 ledger rows over 60 days, then 30-day reports.

    python bench/report.py [--rows N] [--keep PATH]

Fills a fresh SQLite database (migrated to head) with 50 teams, 500 users (one key each), 5 models
and N ledger rows spread evenly over 60 days (95% charged; 80% name one of 1,000 end users, 60% carry
one or two of 8 tags; one row in 1,000 has an adjustment), then times 30-day reports grouped by
team,model, user,day, end_user, tag, end_user,tag and team,tag: the median of 3 runs each, printed
as a table. The target is under a second each. The same statements are then timed once more after
dropping the report index (migrations 0002 and 0009), for comparison. The database is ANALYZEd
after filling, as `PRAGMA optimize` would in a long-lived deployment: with those statistics
SQLite's planner picks a slow skip-scan unless told which index to use.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.core.pricing import DEFAULT_PRICES, parse_credits  # noqa: E402
from gateway.ops import reports  # noqa: E402
from gateway.store import migrate

TEAMS, USERS, DAYS = 50, 500, 60
DAY_US = 86_400_000_000
START_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
BATCH = 100_000
OUTCOMES = ["charged"] * 19 + ["upstream_error"]
END_USERS, TAGS = (
    1_000,
    [f"feature:{name}" for name in ("chat", "search", "summary", "code", "agent", "eval", "rag", "batch")],
)
RUNS = 3


def fill(path: Path, rows: int) -> None:
    """Teams, users, keys and `rows` ledger rows, inserted with sqlite3 in large transactions."""
    rng = random.Random(1)
    models = [(m, parse_credits(p)) for m, p in DEFAULT_PRICES.items()]
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO teams (id, name, created_at) VALUES (?, ?, 0)",
        [(t, f"team-{t}") for t in range(1, TEAMS + 1)],
    )
    db.executemany(
        "INSERT INTO users (id, name, team_id, created_at) VALUES (?, ?, ?, 0)",
        [(u, f"user-{u}", (u - 1) % TEAMS + 1) for u in range(1, USERS + 1)],
    )
    db.executemany(
        "INSERT INTO api_keys (id, user_id, name, key_hash, prefix, created_at) "
        "VALUES (?, ?, NULL, ?, 'gwk_', 0)",
        [(f"key_{u:016x}", u, f"{u:064x}") for u in range(1, USERS + 1)],
    )
    db.execute("COMMIT")
    span = DAYS * DAY_US
    step = span // rows
    for first in range(0, rows, BATCH):
        batch = []
        tag_rows: list[tuple[str, str]] = []
        adjustments: list[tuple[str, int]] = []
        for i in range(first, min(first + BATCH, rows)):
            user = rng.randrange(1, USERS + 1)
            model, price = models[rng.randrange(len(models))]
            messages = rng.randrange(1, 20)
            outcome = rng.choice(OUTCOMES)
            charged = outcome == "charged"
            admitted = START_US + i * step + rng.randrange(step)
            prompt = rng.randrange(10, 4000) if charged else None
            completion = rng.randrange(1, 1000) if charged else None
            end_user = f"cust-{rng.randrange(END_USERS)}" if rng.random() < 0.8 else None
            tags = rng.sample(TAGS, rng.choice((1, 2))) if rng.random() < 0.6 else []
            tag_rows.extend((f"{i:032x}", tag) for tag in tags)
            if charged and i % 1000 == 0:
                adjustments.append((f"{i:032x}", -(price * messages) // 2))
            batch.append(
                (
                    f"{i:032x}",
                    admitted,
                    admitted + 500_000,
                    (user - 1) % TEAMS + 1,
                    user,
                    f"key_{user:016x}",
                    model,
                    messages,
                    price,
                    price * messages if charged else 0,
                    outcome,
                    200 if charged else 500,
                    prompt,
                    completion,
                    None if prompt is None or completion is None else prompt + completion,
                    0,
                    500_000,
                    end_user,
                    ",".join(tags) or None,
                )
            )
        db.execute("BEGIN")
        db.executemany("INSERT INTO ledger VALUES (" + ", ".join("?" * 19) + ")", batch)
        db.executemany("INSERT INTO ledger_tags (request_id, tag) VALUES (?, ?)", tag_rows)
        db.executemany(
            "INSERT INTO ledger_adjustments (request_id, credits_micros, reason, created_at, actor) "
            "VALUES (?, ?, 'bench', 0, 'bench')",
            adjustments,
        )
        db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()


def timed(url: str, group_by: str, *, index: bool = True) -> tuple[float, int]:
    """Median seconds of RUNS reports over days 15-45, and the report's row count.

    With `index=False`, the report's statement without its index hint, after the index is dropped:
    what the migration that added it was measured against.
    """
    engine = create_engine(url)
    query = reports.ReportQuery(
        START_US + 15 * DAY_US, START_US + 45 * DAY_US, reports.parse_group_by(group_by)
    )
    sql, params = reports.report_sql(query, "sqlite")
    times, count = [], 0
    try:
        for _ in range(RUNS):
            with engine.connect() as conn:
                started = time.perf_counter()
                if index:
                    count = len(reports.usage_report(conn, query).rows)
                else:
                    plain = sql.replace(" INDEXED BY ix_ledger_charged_report", "")
                    count = len(conn.execute(text(plain), params).all())
                times.append(time.perf_counter() - started)
    finally:
        engine.dispose()
    return statistics.median(times), count


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", help="build the database at this path and keep it")
    args = parser.parse_args()
    groupings = ("team,model", "user,day", "end_user", "tag", "end_user,tag", "team,tag")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "bench.db"
        if path.exists():
            path.unlink()
        url = f"sqlite:///{path}"
        migrate.upgrade(f"sqlite+aiosqlite:///{path}")
        started = time.perf_counter()
        fill(path, args.rows)
        size = path.stat().st_size / 1e6
        print(f"filled {args.rows:,} ledger rows in {time.perf_counter() - started:.1f} s ({size:.0f} MB)")
        results = [(g, "ix_ledger_charged_report", *timed(url, g)) for g in groupings]
        db = sqlite3.connect(path)
        db.execute("DROP INDEX ix_ledger_charged_report")
        db.close()
        results += [(g, "none (0001 indexes only)", *timed(url, g, index=False)) for g in groupings]
    print(f"\n30-day report on SQLite {sqlite3.sqlite_version}, {args.rows:,} rows, median of {RUNS}:")
    print(f"{'group_by':<12} {'report index':<26} {'rows':>7} {'seconds':>8}  target < 1 s")
    for group_by, index, seconds, count in results:
        verdict = "ok" if seconds < 1 else "SLOW"
        print(f"{group_by:<12} {index:<26} {count:>7} {seconds:>8.3f}  {verdict}")
    return 0 if all(seconds < 1 for _, _, seconds, _ in results[: len(groupings)]) else 1


if __name__ == "__main__":
    sys.exit(main())
