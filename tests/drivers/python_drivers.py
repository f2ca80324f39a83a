"""Drives a two-shard Shardline with the Python drivers applications use, in
each batching the driver has: psycopg 3 (plain, prepared, pipeline,
executemany, transactions), asyncpg (statement cache on and off, cursors,
executemany, binary COPY split by shard), SQLAlchemy's ORM, psycopg2 (client-side
parameters, executemany, execute_values). Every key this writes is read
back by key and compared; the caller audits each row's physical shard.

Usage: python3 python_drivers.py URL BASE
  URL   postgresql://user:password@127.0.0.1:PORT/db of the proxy
  BASE  first key to use; keys BASE .. BASE+999 must be free in `users`

Exits non-zero on the first mismatch; prints one line per check and
"all checks passed" at the end.
"""
import asyncio
import re
import sys

import asyncpg
import psycopg
from psycopg import errors


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}")


class Keys:
    """The keys written so far, with the name each must read back."""

    def __init__(self):
        self.names = {}

    def add(self, k, name):
        self.names[k] = name


def failing_executemany(conn, new, taken, returning):
    """psycopg's executemany of rows `new` then `taken`, a key already
    written: the unique violation rolls every row back, on every shard."""
    try:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO users (id, name) VALUES (%s, 'dup')"
                + (" RETURNING id" if returning else ""),
                [(k,) for k in new + [taken]],
                returning=returning,
            )
        raise AssertionError("expected a unique violation")
    except errors.UniqueViolation:
        pass
    n = conn.execute("SELECT count(*) FROM users WHERE id = ANY(%s)", (new,)).fetchone()[0]
    what = " returning" if returning else ""
    check(f"psycopg executemany{what} with a failing row leaves nothing", n == 0, n)


def psycopg_checks(url, base, keys):
    # Plain extended protocol in autocommit: unnamed Parse/Bind per statement.
    with psycopg.connect(url, autocommit=True) as conn:
        for k in range(base, base + 30):
            conn.execute("INSERT INTO users (id, name) VALUES (%s, %s)", (k, f"plain {k}"))
            keys.add(k, f"plain {k}")
        check("psycopg plain inserts", True)
        # prepare=True: a named Parse and its Bind in one unit, then Binds alone.
        for k in range(base + 30, base + 60):
            conn.execute(
                "INSERT INTO users (id, name) VALUES (%s, %s)", (k, f"prepared {k}"), prepare=True
            )
            keys.add(k, f"prepared {k}")
        check("psycopg prepared inserts", True)
        # Pipeline mode, a Sync after each statement.
        with conn.pipeline() as p:
            for k in range(base + 60, base + 90):
                conn.execute("INSERT INTO users (id, name) VALUES (%s, %s)", (k, f"pipeline {k}"))
                p.sync()
                keys.add(k, f"pipeline {k}")
        check("psycopg pipeline with a sync per statement", True)
        # Binary parameters and results, prepared from the first execution.
        conn.prepare_threshold = 0
        with conn.cursor(binary=True) as cur:
            for k in range(base, base + 90):
                cur.execute("SELECT name FROM users WHERE id = %b", (k,))
                row = cur.fetchone()
                check_quiet(row and row[0] == keys.names[k], f"binary read of {k}: {row}")
        check("psycopg binary prepared reads by key", True)
        # Executions for several shards in one pipeline up to one Sync, and
        # executemany (a pipeline): each row on its key's shard.
        with conn.pipeline():
            for k in range(base + 90, base + 94):
                conn.execute("INSERT INTO users (id, name) VALUES (%s, %s)", (k, f"pipe {k}"))
                keys.add(k, f"pipe {k}")
        check("psycopg pipeline spanning shards", True)
        # DDL in the pipeline beside keyed rows: on every shard, up to one Sync.
        with conn.pipeline():
            conn.execute("CREATE TABLE IF NOT EXISTS pipe_migration (id bigint PRIMARY KEY)")
            for k in range(base + 94, base + 98):
                conn.execute("INSERT INTO users (id, name) VALUES (%s, %s)", (k, f"pipe ddl {k}"))
                keys.add(k, f"pipe ddl {k}")
            conn.execute("ALTER TABLE pipe_migration ADD COLUMN IF NOT EXISTS at int")
        n = conn.execute("SELECT count(at) FROM pipe_migration").fetchone()[0]
        check("psycopg pipeline with DDL spanning shards", n == 0, n)
        with conn.cursor() as cur:
            rows = [(k, f"many {k}") for k in range(base + 130, base + 150)]
            cur.executemany("INSERT INTO users (id, name) VALUES (%s, %s)", rows)
            for k, name in rows:
                keys.add(k, name)
        check("psycopg executemany spanning shards", True)
        # A failing row rolls the whole executemany back, on every shard.
        failing_executemany(conn, [base + 150, base + 151], base + 130, returning=False)
        # executemany(returning=True): every row sent, then a Flush for the
        # results before the Sync. The pipeline runs on every shard it
        # needs at that Flush; the rows come back in order.
        with conn.cursor() as cur:
            rows = [(k, f"returning {k}") for k in range(base + 920, base + 930)]
            cur.executemany(
                "INSERT INTO users (id, name) VALUES (%s, %s) RETURNING id, name",
                rows,
                returning=True,
            )
            got = []
            while True:
                got.extend(cur.fetchall())
                if not cur.nextset():
                    break
            for k, name in rows:
                keys.add(k, name)
        check("psycopg executemany returning spanning shards", got == rows, got)
        failing_executemany(conn, [base + 930, base + 931], base + 920, returning=True)
        # Results fetched inside a pipeline, before its Sync (a Flush), as
        # psycopg's pipeline mode does for each fetch: each execution runs
        # on its key's shard, a shard joining the pipeline when a row needs
        # it, and the pipeline's Sync commits them all.
        fetched = list(range(base + 900, base + 910))
        with conn.pipeline(), conn.cursor() as cur:
            for k in fetched:
                cur.execute(
                    "INSERT INTO users (id, name) VALUES (%s, %s) RETURNING id", (k, f"fetched {k}")
                )
                check_quiet(cur.fetchall() == [(k,)], f"returned {k}")
        for k in fetched:
            keys.add(k, f"fetched {k}")
        check("psycopg pipeline fetching each result across shards", True)
        # Reads fetched one by one in a pipeline: each key read on its
        # shard (a read on another finds no row), then a write after them.
        with conn.pipeline(), conn.cursor() as cur:
            for k in fetched:
                cur.execute("SELECT name FROM users WHERE id = %s", (k,))
                check_quiet(cur.fetchall() == [(f"fetched {k}",)], f"read {k}")
            cur.execute(
                "INSERT INTO users (id, name) VALUES (%s, %s) RETURNING id",
                (base + 911, f"fetched {base + 911}"),
            )
            check_quiet(cur.fetchall() == [(base + 911,)], f"returned {base + 911}")
        keys.add(base + 911, f"fetched {base + 911}")
        check("psycopg pipeline fetching each read across shards", True)
        # A duplicate after rows for both shards: nothing of the pipeline stays.
        failing = list(range(base + 940, base + 948))
        try:
            with conn.pipeline(), conn.cursor() as cur:
                for k in failing + [base + 900]:
                    cur.execute("INSERT INTO users (id, name) VALUES (%s, 'dup') RETURNING id", (k,))
                    cur.fetchall()
            raise AssertionError("expected a unique violation")
        except errors.UniqueViolation:
            pass
        n = conn.execute("SELECT count(*) FROM users WHERE id = ANY(%s)", (failing,)).fetchone()[0]
        check("psycopg pipeline fetching across shards with a failing row leaves nothing", n == 0, n)
        # One shard's execution fetched before the Sync runs.
        with conn.pipeline(), conn.cursor() as cur:
            cur.execute(
                "INSERT INTO users (id, name) VALUES (%s, %s) RETURNING name",
                (base + 910, f"fetched {base + 910}"),
            )
            row = cur.fetchone()
        keys.add(base + 910, f"fetched {base + 910}")
        check("psycopg pipeline fetching before its Sync", row == (f"fetched {base + 910}",), row)

    # Settings from the startup packet reach the driver in ParameterStatus:
    # psycopg parses dates by the DateStyle the session reports.
    import datetime

    with psycopg.connect(url, autocommit=True, options="-c TimeZone=UTC -c DateStyle=SQL,DMY") as conn:
        d = conn.execute("SELECT '2026-01-03'::date").fetchone()[0]
        check("psycopg date under DateStyle SQL,DMY from options", d == datetime.date(2026, 1, 3), d)
    # psycopg attaches the session's TimeZone (from ParameterStatus).
    with psycopg.connect(url, autocommit=True, options="-c TimeZone=Asia/Tokyo") as conn:
        tz = conn.execute("SELECT '2026-01-03 10:00:00+00'::timestamptz").fetchone()[0]
        check("psycopg time zone from options", tz.utcoffset() == datetime.timedelta(hours=9), tz)

    # Transactions (psycopg's default): a write and a read on one key,
    # committed; another rolled back.
    with psycopg.connect(url) as conn:
        for k in range(base + 100, base + 120):
            conn.execute("INSERT INTO users (id, name) VALUES (%s, %s)", (k, f"txn {k}"))
            row = conn.execute("SELECT name FROM users WHERE id = %s", (k,)).fetchone()
            check_quiet(row == (f"txn {k}",), f"read in transaction {k}: {row}")
            conn.commit()
            keys.add(k, f"txn {k}")
        # A named (server-side) cursor on one key, in the transaction.
        with conn.cursor(name="by_key") as cur:
            cur.execute("SELECT id, name FROM users WHERE id = %s", (base + 105,))
            rows = cur.fetchall()
        check("psycopg named cursor", rows == [(base + 105, f"txn {base + 105}")], rows)
        conn.commit()
        conn.execute("INSERT INTO users (id, name) VALUES (%s, 'rolled back')", (base + 120,))
        conn.rollback()
        row = conn.execute("SELECT name FROM users WHERE id = %s", (base + 120,)).fetchone()
        check("psycopg transactions commit and roll back", row is None, row)
        conn.rollback()
        # A statement refused inside a transaction fails it; ROLLBACK recovers.
        conn.execute("SELECT name FROM users WHERE id = %s", (base,)).fetchone()
        try:
            conn.execute("SELECT count(*) FROM users WHERE id IN (%s, %s)", (base, base + 1))
            conn.execute("SELECT 1 FROM users u, orders o LIMIT 1")
        except psycopg.Error:
            pass
        conn.rollback()
        row = conn.execute("SELECT name FROM users WHERE id = %s", (base,)).fetchone()
        check("psycopg rollback after an error", row == (keys.names[base],), row)
        conn.commit()
        # executemany inside a transaction (psycopg's default): a pipeline
        # whose rows join the transaction on their shards; committed with
        # the statements around it, rolled back, and failed by a row.
        cur = conn.cursor()
        rows = [(k, f"txn many {k}") for k in range(base + 160, base + 170)]
        cur.executemany("INSERT INTO users (id, name) VALUES (%s, %s)", rows)
        cur.execute("UPDATE users SET name = %s WHERE id = %s", (f"txn many {base + 160}!", base + 160))
        conn.commit()
        for k, name in rows:
            keys.add(k, name)
        keys.add(base + 160, f"txn many {base + 160}!")
        cur.executemany(
            "INSERT INTO users (id, name) VALUES (%s, 'rolled back')",
            [(k,) for k in range(base + 170, base + 180)],
        )
        conn.rollback()
        try:
            cur.executemany(
                "INSERT INTO users (id, name) VALUES (%s, 'dup')",
                [(base + 180,), (base + 181,), (base + 161,), (base + 182,)],
            )
            raise AssertionError("expected a unique violation")
        except errors.UniqueViolation:
            pass
        try:
            cur.execute("SELECT 1")
            raise AssertionError("expected the transaction to be failed")
        except errors.InFailedSqlTransaction:
            pass
        conn.rollback()
        n = conn.execute(
            "SELECT count(*) FROM users WHERE id BETWEEN %s AND %s", (base + 170, base + 189)
        ).fetchone()[0]
        check("psycopg executemany in transactions: commit, rollback, failed row", n == 0, n)
        conn.commit()
        # Pipeline mode fetching each result inside a transaction (BEGIN
        # sent in the pipeline): the shards join the transaction as rows
        # need them; committed, then rolled back, then failed by a row.
        fetched_txn = list(range(base + 950, base + 958))
        with conn.pipeline(), conn.cursor() as cur:
            for k in fetched_txn:
                cur.execute("INSERT INTO users (id, name) VALUES (%s, %s) RETURNING id", (k, f"txn fetched {k}"))
                check_quiet(cur.fetchall() == [(k,)], f"returned {k} in a transaction")
                cur.execute("SELECT name FROM users WHERE id = %s", (k,))
                check_quiet(cur.fetchall() == [(f"txn fetched {k}",)], f"read {k} in a transaction")
        conn.commit()
        for k in fetched_txn:
            keys.add(k, f"txn fetched {k}")
        with conn.pipeline(), conn.cursor() as cur:
            for k in range(base + 958, base + 964):
                cur.execute("INSERT INTO users (id, name) VALUES (%s, 'rolled back') RETURNING id", (k,))
                cur.fetchall()
        conn.rollback()
        try:
            with conn.pipeline(), conn.cursor() as cur:
                for k in list(range(base + 964, base + 970)) + [base + 950]:
                    cur.execute("INSERT INTO users (id, name) VALUES (%s, 'dup') RETURNING id", (k,))
                    cur.fetchall()
            raise AssertionError("expected a unique violation")
        except errors.UniqueViolation:
            pass
        conn.rollback()
        n = conn.execute(
            "SELECT count(*) FROM users WHERE id BETWEEN %s AND %s", (base + 958, base + 969)
        ).fetchone()[0]
        check("psycopg pipeline fetching each result in transactions: commit, rollback, failed row", n == 0, n)
        conn.commit()
        # Read-only transactions (BEGIN READ ONLY): each on its first key's
        # shard, whichever shard that is.
        conn.read_only = True
        for k in range(base + 100, base + 104):
            row = conn.execute("SELECT name FROM users WHERE id = %s", (k,)).fetchone()
            check_quiet(row == (f"txn {k}",), f"read-only transaction read of {k}: {row}")
            conn.commit()
        conn.read_only = False
        check("psycopg read-only transactions on each shard", True)


def check_quiet(cond, detail):
    if not cond:
        raise AssertionError(detail)


async def asyncpg_checks(url, base, keys):
    for cache, start in ((100, base + 200), (0, base + 260)):
        conn = await asyncpg.connect(url, statement_cache_size=cache)
        # First execution: Parse+Describe+Flush, then Bind+Execute+Sync.
        for k in range(start, start + 30):
            await conn.execute("INSERT INTO users (id, name) VALUES ($1, $2)", k, f"asyncpg {k}")
            keys.add(k, f"asyncpg {k}")
        for k in range(start, start + 30):
            name = await conn.fetchval("SELECT name FROM users WHERE id = $1", k)
            check_quiet(name == f"asyncpg {k}", f"asyncpg read of {k}: {name}")
        # A keyless aggregate merged across shards.
        n = await conn.fetchval(
            "SELECT count(*) FROM users WHERE id BETWEEN $1 AND $2", start, start + 29
        )
        check(f"asyncpg statement_cache_size={cache}: writes, reads, merged count", n == 30, n)
        # Lookups by another column than the key ask every shard, and
        # fetchrow/fetchval ask for one row: the row on one shard, on none,
        # on both.
        got = []
        for k in (start, start + 1, start + 2, start + 3):
            row = await conn.fetchrow("SELECT id, name FROM users WHERE name = $1", f"asyncpg {k}")
            got.append(tuple(row) if row else None)
        none = await conn.fetchval("SELECT id FROM users WHERE name = $1", "nobody")
        some = await conn.fetchval(
            "SELECT id FROM users WHERE id BETWEEN $1 AND $2", start, start + 29
        )
        check(
            f"asyncpg fetchrow/fetchval by a column other than the key (cache {cache})",
            got == [(k, f"asyncpg {k}") for k in range(start, start + 4)]
            and none is None
            and start <= some < start + 30,
            (got, none, some),
        )
        # A merged GROUP BY with a parameter in HAVING, bound in binary.
        rows = await conn.fetch(
            "SELECT length(name) AS l, count(*) AS n FROM users WHERE id BETWEEN $1 AND $2 "
            "GROUP BY length(name) HAVING count(*) > $3 ORDER BY l",
            start, start + 29, 0,
        )
        want = {}
        for k in range(start, start + 30):
            want[len(f"asyncpg {k}")] = want.get(len(f"asyncpg {k}"), 0) + 1
        got = {r["l"]: r["n"] for r in rows}
        check(f"asyncpg merged HAVING with a parameter (cache {cache})", got == want, (got, want))
        # A cursor inside a transaction, on one key.
        async with conn.transaction():
            rows = [r async for r in conn.cursor("SELECT id FROM users WHERE id = $1", start)]
        check(f"asyncpg cursor (cache {cache})", [r[0] for r in rows] == [start], rows)
        # The cursor object: its Bind is a unit of its own, each fetch an
        # Execute of the named portal with a row limit, in the transaction.
        # On one key: every key's row, from its own shard.
        for k in (start, start + 1, start + 2, start + 3):
            async with conn.transaction():
                cur = await conn.cursor("SELECT id, name FROM users WHERE id = $1", k)
                got = [tuple(r) for r in await cur.fetch(5)]
            check_quiet(got == [(k, f"asyncpg {k}")], f"asyncpg cursor.fetch of {k}: {got}")
        check(f"asyncpg cursor.fetch on one key, each shard (cache {cache})", True)
        # Read-only transactions (BEGIN READ ONLY): each on its key's shard.
        for k in (start, start + 1, start + 2, start + 3):
            async with conn.transaction(readonly=True):
                name = await conn.fetchval("SELECT name FROM users WHERE id = $1", k)
            check_quiet(name == f"asyncpg {k}", f"asyncpg read-only transaction of {k}: {name}")
        check(f"asyncpg read-only transactions on each shard (cache {cache})", True)
        # Over several shards a portal fetched in batches cannot be
        # answered exactly: refused (0A000) however it is sent, never one
        # shard's rows.
        for sql, args in (
            ("SELECT id FROM users WHERE id BETWEEN $1 AND $2 ORDER BY id", (start, start + 29)),
            ("SELECT id FROM users WHERE id BETWEEN $1 AND $2", (start, start + 29)),
        ):
            for how in ("fetch", "iterate"):
                try:
                    async with conn.transaction():
                        if how == "fetch":
                            cur = await conn.cursor(sql, *args)
                            got = await cur.fetch(3)
                        else:
                            got = [r async for r in conn.cursor(sql, *args, prefetch=4)]
                    outcome = f"answered {[r[0] for r in got]}"
                except asyncpg.PostgresError as e:
                    outcome = e.sqlstate
                check_quiet(outcome == "0A000", f"asyncpg cursor {how} of {sql!r}: {outcome}")
        check(f"asyncpg cursors over several shards are refused (cache {cache})", True)
        await conn.close()

    conn = await asyncpg.connect(url)
    # executemany: one Sync for every row, rows on both shards.
    rows = [(k, f"many {k}") for k in range(base + 300, base + 320)]
    await conn.executemany("INSERT INTO users (id, name) VALUES ($1, $2)", rows)
    for k, name in rows:
        keys.add(k, name)
    check("asyncpg executemany spanning shards", True)
    # The same inside a transaction, committed and rolled back.
    rows = [(k, f"txn many {k}") for k in range(base + 430, base + 450)]
    async with conn.transaction():
        await conn.executemany("INSERT INTO users (id, name) VALUES ($1, $2)", rows)
    for k, name in rows:
        keys.add(k, name)
    try:
        async with conn.transaction():
            await conn.executemany(
                "INSERT INTO users (id, name) VALUES ($1, 'gone')",
                [(k,) for k in range(base + 450, base + 460)],
            )
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    n = await conn.fetchval(
        "SELECT count(*) FROM users WHERE id BETWEEN $1 AND $2", base + 430, base + 459
    )
    check("asyncpg executemany in a transaction, committed and rolled back", n == 20, n)
    # Binary COPY (copy_records_to_table): tuples split by shard.
    records = [(k, f"copy {k}") for k in range(base + 400, base + 420)]
    await conn.copy_records_to_table("users", records=records, columns=["id", "name"])
    for k, name in records:
        keys.add(k, name)
    n = await conn.fetchval(
        "SELECT count(*) FROM users WHERE id BETWEEN $1 AND $2", base + 400, base + 419
    )
    check("asyncpg binary COPY split by shard", n == 20, n)
    # Inside a transaction: the COPY's shards join it; rolled back, then
    # committed.
    records = [(k, f"copy txn {k}") for k in range(base + 460, base + 480)]
    try:
        async with conn.transaction():
            await conn.copy_records_to_table("users", records=records, columns=["id", "name"])
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    async with conn.transaction():
        await conn.copy_records_to_table("users", records=records, columns=["id", "name"])
        n = await conn.fetchval(
            "SELECT count(*) FROM users WHERE id BETWEEN $1 AND $2", base + 460, base + 479
        )
    for k, name in records:
        keys.add(k, name)
    check("asyncpg binary COPY in transactions, rolled back then committed", n == 20, n)
    await conn.close()


def sqlalchemy_checks(url, base, keys):
    import datetime

    import sqlalchemy as sa
    from sqlalchemy.orm import (
        DeclarativeBase,
        Mapped,
        Session,
        mapped_column,
        relationship,
        selectinload,
    )

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
        name: Mapped[str]
        # A server default: SQLAlchemy fetches it with RETURNING, so a
        # flush of several users is one multi-row INSERT with parameters
        # (insertmanyvalues), split by shard.
        created_at: Mapped[datetime.datetime] = mapped_column(
            sa.DateTime(timezone=True), server_default=sa.func.now()
        )
        orders: Mapped[list["Order"]] = relationship(
            back_populates="user", cascade="all, delete-orphan", order_by="Order.id"
        )

    class Order(Base):
        __tablename__ = "orders"
        user_id: Mapped[int] = mapped_column(
            sa.BigInteger, sa.ForeignKey("users.id"), primary_key=True
        )
        id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
        amount: Mapped[float] = mapped_column(sa.Numeric(12, 2))
        user: Mapped[User] = relationship(back_populates="orders")

    engine = sa.create_engine("postgresql+psycopg://" + url.split("://", 1)[1])
    # One object per flush and commit.
    with Session(engine) as s:
        for k in range(base + 500, base + 520):
            s.add(User(id=k, name=f"orm {k}"))
            s.commit()
            keys.add(k, f"orm {k}")
    with Session(engine) as s:
        for k in range(base + 500, base + 520):
            u = s.get(User, k)
            check_quiet(u is not None and u.name == f"orm {k}", f"ORM get {k}: {u}")
    check("SQLAlchemy ORM one object per commit, get by key", True)
    # Several objects in one flush, in SQLAlchemy's transaction: one
    # INSERT ... VALUES (...), (...) RETURNING created_at, id with bound
    # parameters, split by shard inside the transaction; each object gets
    # its own row's server default back.
    with Session(engine) as s:
        users = [User(id=k, name=f"flush {k}") for k in range(base + 600, base + 610)]
        s.add_all(users)
        s.flush()
        stamps = {u.id: u.created_at for u in users}
        s.commit()
    with Session(engine) as s:
        for k, stamp in stamps.items():
            check_quiet(s.get(User, k).created_at == stamp, f"created_at of {k}")
    for k in range(base + 600, base + 610):
        keys.add(k, f"flush {k}")
    check("SQLAlchemy multi-object flush across shards", True)
    # Relationships: users with their orders (co-located by user_id) in
    # one flush, loaded lazily and with selectinload, changed, deleted.
    with Session(engine) as s:
        for k in range(base + 800, base + 810):
            s.add(
                User(
                    id=k,
                    name=f"rel {k}",
                    orders=[Order(id=k * 10 + j, amount=j + 1) for j in range(3)],
                )
            )
        s.commit()
    for k in range(base + 800, base + 810):
        keys.add(k, f"rel {k}")
    with Session(engine) as s:
        for k in range(base + 800, base + 810):
            u = s.get(User, k)
            got = [(o.id, int(o.amount)) for o in u.orders]
            check_quiet(got == [(k * 10 + j, j + 1) for j in range(3)], f"orders of {k}: {got}")
        users = s.scalars(
            sa.select(User)
            .where(User.id.between(base + 800, base + 809))
            .options(selectinload(User.orders))
            .order_by(User.id)
        ).all()
        check_quiet(len(users) == 10 and all(len(u.orders) == 3 for u in users), users)
        # Change one order of each user, delete another, in one flush.
        for u in users:
            u.orders[0].amount = 100
            u.orders.pop()
        s.commit()
    with Session(engine) as s:
        total = s.scalar(
            sa.select(sa.func.sum(Order.amount)).where(Order.user_id.between(base + 800, base + 809))
        )
        n = s.scalar(
            sa.select(sa.func.count()).select_from(Order).where(
                Order.user_id.between(base + 800, base + 809)
            )
        )
        check("SQLAlchemy relationships: flush, lazy and selectin loads, update, delete",
              (n, int(total)) == (20, 10 * 102), (n, total))
        # Deleting a user cascades to its orders, on its shard.
        s.delete(s.get(User, base + 809))
        s.commit()
        n = s.scalar(sa.select(sa.func.count()).select_from(Order).where(Order.user_id == base + 809))
        check("SQLAlchemy cascade delete", n == 0 and s.get(User, base + 809) is None, n)
    del keys.names[base + 809]
    engine.dispose()


def psycopg2_checks(url, base, keys):
    """psycopg2: client-side parameters (simple protocol), executemany and
    execute_values (one multi-row INSERT with constants, split by shard)."""
    import psycopg2
    import psycopg2.extras

    conn = psycopg2.connect(url)
    conn.autocommit = True
    cur = conn.cursor()
    for k in range(base + 700, base + 720):
        cur.execute("INSERT INTO users (id, name) VALUES (%s, %s)", (k, f"pg2 {k}"))
        keys.add(k, f"pg2 {k}")
    cur.executemany(
        "INSERT INTO users (id, name) VALUES (%s, %s)",
        [(k, f"pg2 many {k}") for k in range(base + 720, base + 740)],
    )
    for k in range(base + 720, base + 740):
        keys.add(k, f"pg2 many {k}")
    psycopg2.extras.execute_values(
        cur,
        "INSERT INTO users (id, name) VALUES %s",
        [(k, f"pg2 values {k}") for k in range(base + 740, base + 760)],
    )
    for k in range(base + 740, base + 760):
        keys.add(k, f"pg2 values {k}")
    cur.execute("SELECT count(*) FROM users WHERE id BETWEEN %s AND %s", (base + 700, base + 759))
    n = cur.fetchone()[0]
    check("psycopg2 inserts, executemany, execute_values across shards", n == 60, n)
    # A migration sent as one string (as Django's RunSQL does through
    # psycopg2): its DDL runs on every shard, its seed rows on their keys'.
    seed = range(base + 760, base + 766)
    cur.execute(
        "CREATE TABLE IF NOT EXISTS pg2_migration (id bigint PRIMARY KEY, note text); "
        + " ".join(f"INSERT INTO users (id, name) VALUES ({k}, 'pg2 seed {k}');" for k in seed)
        + " ALTER TABLE pg2_migration ADD COLUMN IF NOT EXISTS at int"
    )
    for k in seed:
        keys.add(k, f"pg2 seed {k}")
    cur.execute("SELECT count(*) FROM users WHERE id BETWEEN %s AND %s", (seed[0], seed[-1]))
    n = cur.fetchone()[0]
    cur.execute("SELECT count(at) FROM pg2_migration")
    check("psycopg2 migration string: DDL and seed rows across shards", n == 6, n)
    # In a transaction (psycopg2's default): one key, then rollback.
    conn.autocommit = False
    cur.execute("UPDATE users SET name = 'changed' WHERE id = %s", (base + 700,))
    conn.rollback()
    cur.execute("SELECT name FROM users WHERE id = %s", (base + 700,))
    row = cur.fetchone()
    check("psycopg2 rollback", row == (keys.names[base + 700],), row)
    conn.rollback()
    conn.close()


def final_reads(url, keys):
    with psycopg.connect(url, autocommit=True) as conn:
        for k, name in keys.names.items():
            row = conn.execute("SELECT name FROM users WHERE id = %s", (k,)).fetchone()
            check_quiet(row == (name,), f"final read of {k}: {row}")
    check(f"every key read back ({len(keys.names)})", True)
    print("keys " + ",".join(str(k) for k in sorted(keys.names)))


def replay_reads(url, base):
    """The same reads in every batching the drivers use, compared with the
    answers to the statements sent one at a time (psycopg, autocommit, the
    unnamed statement): in a transaction, prepared (named statements),
    binary, in a pipeline with a sync after each, and through asyncpg with
    its statement cache on and off (Parse+Describe+Flush, then Bind)."""
    lo, hi = base, base + 999
    reads = [
        ("SELECT id, name FROM users WHERE id = %s", (base + 5,)),
        ("SELECT name FROM users WHERE id = %s AND name LIKE %s", (base + 131, "%many%")),
        ("SELECT count(*) FROM users WHERE id BETWEEN %s AND %s", (lo, hi)),
        ("SELECT id FROM users WHERE id BETWEEN %s AND %s ORDER BY id DESC LIMIT 7", (lo, hi)),
        ("SELECT length(name), count(*), min(id), max(id) FROM users WHERE id BETWEEN %s AND %s "
         "GROUP BY length(name) ORDER BY 1", (lo, hi)),
        ("SELECT DISTINCT length(name) AS l FROM users WHERE id BETWEEN %s AND %s ORDER BY l",
         (lo, hi)),
        ("SELECT u.id, sum(o.amount) FROM users u JOIN orders o ON o.user_id = u.id "
         "WHERE u.id = %s GROUP BY u.id", (base + 800,)),
        ("SELECT count(*), sum(amount), avg(amount) FROM orders WHERE user_id BETWEEN %s AND %s",
         (lo, hi)),
        ("SELECT id FROM users WHERE id BETWEEN %s AND %s ORDER BY id OFFSET %s LIMIT %s",
         (lo, hi, 10, 5)),
    ]

    def rows(r):
        return [tuple(x) for x in r]

    with psycopg.connect(url, autocommit=True) as conn:
        baseline = [rows(conn.execute(q, p).fetchall()) for q, p in reads]
    check_quiet(all(b for b in baseline[:6]), f"baseline reads found rows: {baseline}")
    variants = {}
    with psycopg.connect(url) as conn:
        variants["in a transaction"] = [rows(conn.execute(q, p).fetchall()) for q, p in reads]
        conn.rollback()
    with psycopg.connect(url, autocommit=True) as conn:
        variants["prepared"] = [rows(conn.execute(q, p, prepare=True).fetchall()) for q, p in reads]
        variants["prepared again"] = [
            rows(conn.execute(q, p, prepare=True).fetchall()) for q, p in reads
        ]
        with conn.cursor(binary=True) as cur:
            variants["binary"] = [rows(cur.execute(q, p).fetchall()) for q, p in reads]
        out = []
        with conn.pipeline() as pipe:
            for q, p in reads:
                cur = conn.execute(q, p)
                pipe.sync()
                out.append(rows(cur.fetchall()))
        variants["pipeline, a sync after each"] = out

    async def with_asyncpg(cache):
        conn = await asyncpg.connect(url, statement_cache_size=cache)
        out = []
        for q, p in reads:
            n = iter(range(1, 10))
            dollar = "".join(f"${next(n)}" if part == "%s" else part for part in re.split(r"(%s)", q))
            out.append([tuple(r) for r in await conn.fetch(dollar, *p)])
        await conn.close()
        return out

    variants["asyncpg, statement cache"] = asyncio.run(with_asyncpg(100))
    variants["asyncpg, no statement cache"] = asyncio.run(with_asyncpg(0))
    for name, got in variants.items():
        for (q, _), want, have in zip(reads, baseline, got):
            check_quiet(have == want, f"{name}: {q}: {have} != {want} (one at a time)")
        check(f"replayed reads equal one at a time: {name}", True)


def main():
    url, base = sys.argv[1], int(sys.argv[2])
    keys = Keys()
    psycopg_checks(url, base, keys)
    asyncio.run(asyncpg_checks(url, base, keys))
    sqlalchemy_checks(url, base, keys)
    psycopg2_checks(url, base, keys)
    replay_reads(url, base)
    final_reads(url, keys)
    print("all checks passed")


if __name__ == "__main__":
    main()
