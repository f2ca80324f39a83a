"""asyncpg while a shard's primary is down.

    python3 primary_down.py URL UP_KEYS DOWN_KEYS

Every key's row in `users` is named "user KEY". UP_KEYS live on shards whose
primary is up, DOWN_KEYS on the shard whose primary is down (comma lists;
either may be empty). asyncpg prepares each statement with Parse, Describe
and Flush before binding it: reads of every key must be answered (by the
replicas where the primary is down), in autocommit and in read-only
transactions, in read-write transactions on shards whose primary is up, and
in transactions whose first statement reads where it is down (begun on a
replica, read-only there: a write in one fails with 25006); writes must
succeed where the primary is up and fail with a connection error (class 08
or 57) where it is down; a pool's connections must be reset and reused;
SQLAlchemy's ORM on asyncpg and psycopg2 (each opens a transaction before
its first statement) must read every key; psycopg 3's pipeline mode fetching
each read must read every key in one pipeline (the shards it needs joining
as it goes, a replica serving where the primary is down), and a write after
those reads must succeed on an up shard (sending none of the user's reads to
a primary: the admin console's SHOW READ_YOUR_WRITES) and fail where the
primary is down, leaving nothing; a pipeline sent whole to its Sync (psycopg
3), one fetched as it goes that writes first, and a query string (psycopg2)
that read a key where the primary is down and write one where it is up must
run the read on a replica and commit the write;
with autocommit off, such a pipeline's transaction whose
first read is where the primary is down must begin on a replica (a write in
it fails with 25006), and one on an up shard on its primary. Prints "all
checks passed".
"""

import asyncio
import sys
import time

import asyncpg


def keys(arg):
    return [int(k) for k in arg.split(",") if k]


async def main(url, up, down):
    for cache in (100, 0):
        conn = await asyncpg.connect(url, statement_cache_size=cache)
        for k in up + down:
            name = await conn.fetchval("SELECT name FROM users WHERE id = $1", k)
            assert name == f"user {k}", (cache, k, name)
            row = await conn.fetchrow("SELECT id, name FROM users WHERE id = $1", k)
            assert tuple(row) == (k, f"user {k}"), (cache, k, row)
            async with conn.transaction(readonly=True):
                name = await conn.fetchval("SELECT name FROM users WHERE id = $1", k)
            assert name == f"user {k}", ("read-only transaction", cache, k, name)
        print(f"ok reads of every key, autocommit and read-only transactions (cache {cache})")
        for k in up:
            async with conn.transaction():
                name = await conn.fetchval("SELECT name FROM users WHERE id = $1", k)
                await conn.execute("UPDATE users SET name = $2 WHERE id = $1", k, f"user {k}")
            assert name == f"user {k}", ("read-write transaction", cache, k, name)
            await conn.execute("UPDATE users SET name = $2 WHERE id = $1", k, f"user {k}")
        print(f"ok writes where the primary is up (cache {cache})")
        # A transaction beginning with a statement any shard answers (as
        # SQLAlchemy begins each connection: SELECT version()) runs where a
        # primary is up.
        for k in up:
            async with conn.transaction():
                version = await conn.fetchval("SELECT pg_catalog.version()")
                name = await conn.fetchval("SELECT name FROM users WHERE id = $1", k)
            assert version.startswith("PostgreSQL") and name == f"user {k}", (k, version, name)
        print(f"ok transactions beginning with a statement for any shard (cache {cache})")
        for k in down:
            try:
                await conn.execute("UPDATE users SET name = $2 WHERE id = $1", k, f"user {k}")
                outcome = "written"
            except asyncpg.PostgresError as e:
                outcome = e.sqlstate
            assert outcome[:2] in ("08", "57"), ("write where the primary is down", k, outcome)
        print(f"ok writes where the primary is down fail with a connection error (cache {cache})")
        # A transaction whose first statement reads, where the primary is
        # down: it begins on a replica, read-only there.
        for k in down:
            async with conn.transaction():
                name = await conn.fetchval("SELECT name FROM users WHERE id = $1", k)
            assert name == f"user {k}", ("transaction where the primary is down", cache, k, name)
            try:
                async with conn.transaction():
                    await conn.fetchval("SELECT name FROM users WHERE id = $1", k)
                    await conn.execute("UPDATE users SET name = $2 WHERE id = $1", k, f"user {k}")
                outcome = "written"
            except asyncpg.PostgresError as e:
                outcome = e.sqlstate
            assert outcome == "25006", ("a write in a transaction begun on a replica", cache, k, outcome)
            # SERIALIZABLE: a hot standby refuses it, so it waits for the
            # primary and fails with a connection error meanwhile.
            try:
                async with conn.transaction(isolation="serializable"):
                    await conn.fetchval("SELECT name FROM users WHERE id = $1", k)
                outcome = "read"
            except asyncpg.PostgresError as e:
                outcome = f"{e.sqlstate} {e}"
            assert outcome[:2] in ("08", "57") and "unavailable" in outcome, ("a serializable transaction where the primary is down", cache, k, outcome)
        print(f"ok transactions beginning with a read where the primary is down run on a replica (cache {cache})")
        await conn.close()
    # A pool resets each connection it gets back (pg_advisory_unlock_all(),
    # CLOSE ALL, UNLISTEN *, RESET ALL): nothing that needs a primary.
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    for k in up + down:
        async with pool.acquire() as conn:
            name = await conn.fetchval("SELECT name FROM users WHERE id = $1", k)
        assert name == f"user {k}", ("pool", k, name)
        name = await pool.fetchval("SELECT name FROM users WHERE id = $1", k)
        assert name == f"user {k}", ("pool.fetchval", k, name)
    await pool.close()
    print("ok a pool's connections are reset and reused")
    await sqlalchemy_orm(url, up + down)
    psycopg2_transactions(url, up + down)
    psycopg2_query_string(url, up, down)
    psycopg_pipeline(url, up, down)
    print("all checks passed")


async def sqlalchemy_orm(url, keys):
    """SQLAlchemy's ORM on asyncpg: every connection it opens begins a
    transaction and asks the server's version; each session is a
    transaction, whose first statement reads (on a replica where the
    primary is down)."""
    from sqlalchemy import BigInteger, String, select
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
        name: Mapped[str] = mapped_column(String)

    engine = create_async_engine("postgresql+asyncpg://" + url.split("://", 1)[1])
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    for k in keys:
        async with sessions() as session:
            user = await session.get(User, k)
            assert user is not None and user.name == f"user {k}", ("SQLAlchemy get", k, user)
            name = await session.scalar(select(User.name).where(User.id == k))
            assert name == f"user {k}", ("SQLAlchemy select", k, name)
    await engine.dispose()
    print("ok SQLAlchemy ORM on asyncpg")


def psycopg2_transactions(url, keys):
    """psycopg2 (autocommit off, its default) opens a transaction before the
    first statement after each commit: BEGIN, then the read."""
    import psycopg2

    conn = psycopg2.connect(url)
    for k in keys:
        with conn.cursor() as cur:
            cur.execute("SELECT name FROM users WHERE id = %s", (k,))
            row = cur.fetchone()
        assert row == (f"user {k}",), ("psycopg2", k, row)
        conn.commit()
    conn.close()
    print("ok psycopg2 reads in its transactions")


def psycopg2_query_string(url, up, down):
    """psycopg2 in autocommit sends a query string as it is: one reading a
    key where the primary is down and writing one where it is up runs the
    read on a replica and commits the write."""
    import psycopg2

    if not up:
        return
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "SELECT name FROM users WHERE id = %s; UPDATE users SET name = 'in one string' WHERE id = %s",
            (down[0], up[0]),
        )
        assert cur.rowcount == 1, ("the write of the query string", cur.rowcount)
        cur.execute("SELECT name FROM users WHERE id = %s", (up[0],))
        name = cur.fetchone()[0]
        assert name == "in one string", ("the query string's write was not committed", name)
        cur.execute("UPDATE users SET name = %s WHERE id = %s", (f"user {up[0]}", up[0]))
    conn.close()
    print("ok psycopg2 query string: a read where the primary is down, a write where it is up")


def psycopg_pipeline(url, up, down):
    """psycopg 3's pipeline mode fetching each result (a Flush after each
    execution, one Sync at the end)."""
    import psycopg

    read = "SELECT name FROM users WHERE id = %s"
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.pipeline(), conn.cursor() as cur:
            for k in down + up:
                cur.execute(read, (k,))
                row = cur.fetchall()
                assert row == [(f"user {k}",)], ("psycopg pipeline", k, row)
        print("ok psycopg pipeline reads of every key, fetched one by one")
        if up:
            # The user's reads of no shard are sent to a primary for a
            # while (read-your-writes with a write's position unknown):
            # asked of the admin console before and after.
            console = url.rsplit("/", 1)[0] + "/shardline"

            def primary_windows():
                with psycopg.connect(console, autocommit=True) as admin:
                    rows = admin.execute("SHOW READ_YOUR_WRITES").fetchall()
                return [r for r in rows if int(r[4]) > 0]

            for _ in range(100):
                if not primary_windows():
                    break
                time.sleep(0.05)
            with conn.pipeline(), conn.cursor() as cur:
                for k in down + up[:1]:
                    cur.execute(read, (k,))
                    cur.fetchall()
                cur.execute("UPDATE users SET name = name WHERE id = %s RETURNING id", (up[0],))
                assert cur.fetchall() == [(up[0],)]
            # The reads' legs on the down shard's replica wrote nothing: no
            # position is asked of them (it fails on a standby, and the
            # user's reads of that shard would wait for its primary).
            windows = primary_windows()
            assert not windows, ("reads sent to a primary after a pipeline that read on a replica", windows)
            print("ok psycopg pipeline reads, then a write where the primary is up")
        if up:
            # A pipeline sent whole to its Sync (nothing fetched before the
            # block ends) reading a key where the primary is down and
            # writing one where it is up: the read is served by a replica,
            # the write commits.
            with conn.cursor() as reading, conn.cursor() as writing:
                with conn.pipeline():
                    reading.execute(read, (down[0],))
                    writing.execute("UPDATE users SET name = 'pipelined' WHERE id = %s RETURNING id", (up[0],))
                assert reading.fetchall() == [(f"user {down[0]}",)], "the read where the primary is down"
                assert writing.fetchall() == [(up[0],)], "the write where it is up"
            name = conn.execute(read, (up[0],)).fetchone()[0]
            assert name == "pipelined", ("the pipeline's write was not committed", name)
            conn.execute("UPDATE users SET name = %s WHERE id = %s", (f"user {up[0]}", up[0]))
            print("ok psycopg pipeline to its Sync: a read where the primary is down, a write where it is up")
            # Fetched as it goes: a write where the primary is up, then a
            # read where it is down (that shard joins the pipeline after
            # the write, on a replica).
            with conn.pipeline(), conn.cursor() as cur:
                cur.execute("UPDATE users SET name = 'fetched' WHERE id = %s RETURNING id", (up[0],))
                assert cur.fetchall() == [(up[0],)], "the write where the primary is up"
                cur.execute(read, (down[0],))
                assert cur.fetchall() == [(f"user {down[0]}",)], "the read where it is down, after a write"
            name = conn.execute(read, (up[0],)).fetchone()[0]
            assert name == "fetched", ("the fetched pipeline's write was not committed", name)
            conn.execute("UPDATE users SET name = %s WHERE id = %s", (f"user {up[0]}", up[0]))
            print("ok psycopg pipeline fetched as it goes: a write where the primary is up, then a read where it is down")
        try:
            with conn.pipeline(), conn.cursor() as cur:
                for k in up + down[:1]:
                    cur.execute(read, (k,))
                    cur.fetchall()
                for k in up + down:
                    cur.execute("UPDATE users SET name = 'changed' WHERE id = %s RETURNING id", (k,))
                    cur.fetchall()
            outcome = "committed"
        except psycopg.Error as e:
            outcome = f"{e.sqlstate} {e}"
        # Where the primary is down: read-only there (25006) when the read
        # ran on its replica, unavailable when a write needs it (08/57).
        assert outcome[:2] in ("08", "57", "25"), ("a pipeline writing where the primary is down", outcome)
        n = conn.execute("SELECT count(*) FROM users WHERE name = 'changed'").fetchone()[0]
        assert n == 0, ("a failed pipeline left rows changed", n)
    print("ok psycopg pipeline writing where the primary is down fails and leaves nothing")
    # With autocommit off (psycopg's default) each pipeline is a
    # transaction, its BEGIN sent in the unit of its first read: one whose
    # first read is where the primary is down begins on a replica,
    # read-only there, as one begun by a simple BEGIN does.
    with psycopg.connect(url) as conn:
        for k in down:
            with conn.pipeline(), conn.cursor() as cur:
                cur.execute(read + " AND pg_is_in_recovery()", (k,))
                row = cur.fetchall()
            conn.commit()
            assert row == [(f"user {k}",)], ("psycopg pipeline in a transaction, on a replica", k, row)
            try:
                with conn.pipeline(), conn.cursor() as cur:
                    cur.execute(read, (k,))
                    cur.fetchall()
                    cur.execute("UPDATE users SET name = 'changed' WHERE id = %s RETURNING id", (k,))
                    cur.fetchall()
                conn.commit()
                outcome = "committed"
            except psycopg.Error as e:
                outcome = e.sqlstate
                conn.rollback()
            assert outcome == "25006", ("a write in a pipeline's transaction begun on a replica", k, outcome)
        for k in up:
            with conn.pipeline(), conn.cursor() as cur:
                cur.execute(read + " AND NOT pg_is_in_recovery()", (k,))
                row = cur.fetchall()
                cur.execute("UPDATE users SET name = name WHERE id = %s RETURNING id", (k,))
                assert cur.fetchall() == [(k,)]
            conn.commit()
            assert row == [(f"user {k}",)], ("psycopg pipeline in a transaction, on the primary", k, row)
        n = conn.execute("SELECT count(*) FROM users WHERE name = 'changed'").fetchone()[0]
        conn.commit()
        assert n == 0, ("a failed transaction left rows changed", n)
    print("ok psycopg pipeline transactions: reads where the primary is down on a replica, writes where it is up")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], keys(sys.argv[2]), keys(sys.argv[3])))
