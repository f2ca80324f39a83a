"""Cross-shard reads and a transaction on two shards through Shardline with
psycopg 3, compared with an unsharded server holding the same rows; exits
non-zero on any difference.

Usage: python3 psycopg_sharded_check.py PROXY_URL ORACLE_URL KEY_ON_S0 KEY_ON_S1
"""
import sys

import psycopg

QUERIES = [
    ("SELECT id, name FROM users ORDER BY age DESC, id LIMIT %s", (7,)),
    ("SELECT city, count(*), avg(age), min(name), sum(id) FROM users GROUP BY city ORDER BY city NULLS FIRST", None),
    ("SELECT count(DISTINCT city), max(age), bool_or(age > 60) FROM users", None),
    ("SELECT DISTINCT age FROM users ORDER BY age LIMIT %s OFFSET %s", (5, 3)),
    ("SELECT name FROM users WHERE age > %s ORDER BY id DESC", (40,)),
]


def rows(conn, sql, params, binary, prepare):
    with conn.cursor(binary=binary) as cur:
        cur.execute(sql, params, prepare=prepare)
        return cur.fetchall()


def main(proxy_url, oracle_url, a, b):
    with psycopg.connect(proxy_url, autocommit=True) as proxy, psycopg.connect(oracle_url, autocommit=True) as oracle:
        checked = 0
        for sql, params in QUERIES:
            for binary in (False, True):
                for prepare in (False, True):
                    got = rows(proxy, sql, params, binary, prepare)
                    want = rows(oracle, sql, params, binary, prepare)
                    assert got == want, (sql, binary, prepare, got[:3], want[:3])
                    checked += 1
        print(f"{checked} merged reads equal")

    # A transaction on two shards (two-phase commit), psycopg's own commit.
    with psycopg.connect(proxy_url) as conn:
        conn.execute("UPDATE users SET name = 'py' WHERE id = %s", (a,))
        conn.execute("UPDATE users SET name = 'py' WHERE id = %s", (b,))
        conn.commit()
        conn.execute("UPDATE users SET name = 'gone' WHERE id = %s", (a,))
        conn.execute("UPDATE users SET name = 'gone' WHERE id = %s", (b,))
        conn.rollback()
        names = conn.execute("SELECT name FROM users WHERE id IN (%s, %s) ORDER BY id", (a, b)).fetchall()
        assert names == [("py",), ("py",)], names
    print("all checks passed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
