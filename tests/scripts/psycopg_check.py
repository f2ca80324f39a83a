"""Drives Shardline with psycopg 3 the way applications do; exits non-zero on any mismatch.

Usage: python3 psycopg_check.py "postgresql://app:app@127.0.0.1:PORT/app"
"""
import sys

import psycopg


def main(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS py_items")
        conn.execute("CREATE TABLE py_items (id int PRIMARY KEY, name text, price numeric(10,2))")

    with psycopg.connect(url) as conn:
        # Server-side parameter binding (extended protocol), in a transaction.
        with conn.cursor() as cur:
            for i in range(50):
                cur.execute("INSERT INTO py_items VALUES (%s, %s, %s)", (i, f"item {i}", i * 1.5))
        conn.commit()
        # psycopg prepares a statement after it has run it prepare_threshold times.
        conn.prepare_threshold = 2
        for i in range(20):
            row = conn.execute("SELECT name, price FROM py_items WHERE id = %s", (i,)).fetchone()
            assert row[0] == f"item {i}", row
        # Explicitly prepared, binary results.
        with conn.cursor(binary=True) as cur:
            for i in range(5):
                cur.execute("SELECT id, name FROM py_items WHERE id = %s", (i,), prepare=True)
                assert cur.fetchone() == (i, f"item {i}")
        conn.commit()
        # Rollback leaves nothing.
        conn.execute("DELETE FROM py_items")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM py_items").fetchone()[0] == 50
        conn.commit()
        # Errors keep their SQLSTATE.
        try:
            conn.execute("SELECT 1/0")
            raise AssertionError("expected an error")
        except psycopg.errors.DivisionByZero as e:
            assert e.sqlstate == "22012"
        conn.rollback()
        # COPY both ways.
        with conn.cursor() as cur:
            with cur.copy("COPY py_items (id, name, price) FROM STDIN") as copy:
                for i in range(100, 1100):
                    copy.write_row((i, f"copied {i}", i))
            conn.commit()
            out = []
            with cur.copy("COPY (SELECT id FROM py_items WHERE id >= 100 ORDER BY id) TO STDOUT") as copy:
                for row in copy.rows():
                    out.append(int(row[0]))
            assert out == list(range(100, 1100)), out[:5]
        conn.commit()
        # Pipeline mode: many statements before one Sync.
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(30)]
        assert [c.fetchone()[0] for c in curs] == [i * 2 for i in range(30)]
        conn.commit()
        # executemany uses a pipeline too.
        with conn.cursor() as cur:
            cur.executemany("UPDATE py_items SET price = price + %s WHERE id = %s", [(1, i) for i in range(10)])
        conn.commit()
        assert conn.execute("SELECT price FROM py_items WHERE id = 3").fetchone()[0] == 5.5
    print("psycopg: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
