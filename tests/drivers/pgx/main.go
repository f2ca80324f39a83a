// Drives a two-shard Shardline with pgx (v4, Debian's
// golang-github-jackc-pgx-v4-dev), in each of its statement modes: the
// statement cache preparing named statements (the default), "describe"
// (PgBouncer mode: the unnamed statement), no cache at all, and the simple
// protocol. In each: single-row writes and reads by key, a batch across
// shards (one pipeline up to one Sync) in autocommit and in transactions
// (committed and rolled back), CopyFrom (binary COPY) across shards, a
// merged count, and a pool of goroutines. Every key written is read back;
// the caller audits each row's physical shard.
//
// Usage: pgx-drivers URL BASE
//
//	URL   postgres://user:password@127.0.0.1:PORT/db of the proxy
//	BASE  first key to use; keys BASE .. BASE+999 must be free in `users`
//
// Exits non-zero on the first mismatch; prints one line per check and
// "all checks passed" at the end.
package main

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/jackc/pgx/v4"
	"github.com/jackc/pgx/v4/pgxpool"
)

var ctx = context.Background()

// The keys written so far, with the name each must read back.
var names = map[int64]string{}

func check(name string, ok bool, detail interface{}) {
	if !ok {
		fmt.Printf("FAILED %s: %v\n", name, detail)
		os.Exit(1)
	}
	fmt.Printf("ok %s\n", name)
}

func must(what string, err error) {
	if err != nil {
		fmt.Printf("FAILED %s: %v\n", what, err)
		os.Exit(1)
	}
}

func count(c *pgx.Conn, from, to int64) int64 {
	var n int64
	must("count", c.QueryRow(ctx, "SELECT count(*) FROM users WHERE id BETWEEN $1 AND $2", from, to).Scan(&n))
	return n
}

// One connection mode: its keys start at base.
func mode(url, label string, base int64) {
	c, err := pgx.Connect(ctx, url)
	must("connect "+label, err)
	defer c.Close(ctx)
	for k := base; k < base+20; k++ {
		name := fmt.Sprintf("pgx %s %d", label, k)
		_, err := c.Exec(ctx, "INSERT INTO users (id, name) VALUES ($1, $2)", k, name)
		must("insert", err)
		names[k] = name
	}
	for k := base; k < base+20; k++ {
		var name string
		must("read", c.QueryRow(ctx, "SELECT name FROM users WHERE id = $1", k).Scan(&name))
		if name != names[k] {
			check(fmt.Sprintf("%s read of %d", label, k), false, name)
		}
	}
	check(label+": writes and reads by key", true, "")

	// A batch: every insert before one Sync, rows on both shards.
	b := &pgx.Batch{}
	for k := base + 20; k < base+50; k++ {
		b.Queue("INSERT INTO users (id, name) VALUES ($1, $2)", k, fmt.Sprintf("batch %d", k))
	}
	must("batch", c.SendBatch(ctx, b).Close())
	for k := base + 20; k < base+50; k++ {
		names[k] = fmt.Sprintf("batch %d", k)
	}
	check(label+": batch across shards", count(c, base+20, base+49) == 30, "")

	// Batches in transactions: committed, then rolled back.
	tx, err := c.Begin(ctx)
	must("begin", err)
	b = &pgx.Batch{}
	for k := base + 50; k < base+60; k++ {
		b.Queue("INSERT INTO users (id, name) VALUES ($1, $2)", k, fmt.Sprintf("tx batch %d", k))
	}
	must("tx batch", tx.SendBatch(ctx, b).Close())
	var seen int64
	must("count in tx", tx.QueryRow(ctx, "SELECT count(*) FROM users WHERE id BETWEEN $1 AND $2", base+50, base+59).Scan(&seen))
	must("commit", tx.Commit(ctx))
	for k := base + 50; k < base+60; k++ {
		names[k] = fmt.Sprintf("tx batch %d", k)
	}
	tx, err = c.Begin(ctx)
	must("begin", err)
	b = &pgx.Batch{}
	for k := base + 60; k < base+70; k++ {
		b.Queue("INSERT INTO users (id, name) VALUES ($1, 'gone')", k)
	}
	must("tx batch", tx.SendBatch(ctx, b).Close())
	must("rollback", tx.Rollback(ctx))
	check(label+": batches in transactions, committed and rolled back",
		seen == 10 && count(c, base+50, base+69) == 10, seen)

	// CopyFrom: binary COPY, rows on both shards; and inside a transaction.
	var rows [][]interface{}
	for k := base + 70; k < base+90; k++ {
		rows = append(rows, []interface{}{k, fmt.Sprintf("copy %d", k)})
		names[k] = fmt.Sprintf("copy %d", k)
	}
	n, err := c.CopyFrom(ctx, pgx.Identifier{"users"}, []string{"id", "name"}, pgx.CopyFromRows(rows))
	must("copy", err)
	tx, err = c.Begin(ctx)
	must("begin", err)
	rows = nil
	for k := base + 90; k < base+100; k++ {
		rows = append(rows, []interface{}{k, fmt.Sprintf("tx copy %d", k)})
		names[k] = fmt.Sprintf("tx copy %d", k)
	}
	n2, err := tx.CopyFrom(ctx, pgx.Identifier{"users"}, []string{"id", "name"}, pgx.CopyFromRows(rows))
	must("tx copy", err)
	must("commit", tx.Commit(ctx))
	check(label+": CopyFrom across shards, alone and in a transaction",
		n == 20 && n2 == 10 && count(c, base+70, base+99) == 30, n)
}

func main() {
	url := os.Args[1]
	base, err := strconv.ParseInt(os.Args[2], 10, 64)
	must("base", err)
	sep := "?"
	if strings.Contains(url, "?") {
		sep = "&"
	}
	mode(url, "prepare", base)
	mode(url+sep+"statement_cache_mode=describe", "describe", base+100)
	mode(url+sep+"statement_cache_capacity=0", "no cache", base+200)
	mode(url+sep+"prefer_simple_protocol=true", "simple", base+300)

	// A pool of 10 goroutines, 50 writes and reads each.
	pool, err := pgxpool.Connect(ctx, url+sep+"pool_max_conns=10")
	must("pool", err)
	var wg sync.WaitGroup
	var mu sync.Mutex
	failures := 0
	for g := int64(0); g < 10; g++ {
		wg.Add(1)
		go func(g int64) {
			defer wg.Done()
			for i := int64(0); i < 50; i++ {
				k := base + 400 + g*50 + i
				name := fmt.Sprintf("pool %d", k)
				_, err := pool.Exec(ctx, "INSERT INTO users (id, name) VALUES ($1, $2)", k, name)
				var got string
				if err == nil {
					err = pool.QueryRow(ctx, "SELECT name FROM users WHERE id = $1", k).Scan(&got)
				}
				mu.Lock()
				if err != nil || got != name {
					failures++
				} else {
					names[k] = name
				}
				mu.Unlock()
			}
		}(g)
	}
	wg.Wait()
	pool.Close()
	check("pgxpool: 10 goroutines x 50 writes and reads", failures == 0, failures)

	c, err := pgx.Connect(ctx, url)
	must("connect", err)
	var total int64
	must("merged count", c.QueryRow(ctx, "SELECT count(*) FROM users WHERE id BETWEEN $1 AND $2", base, base+999).Scan(&total))
	check("merged count of every key", total == int64(len(names)), total)
	keys := make([]int64, 0, len(names))
	for k, name := range names {
		var got string
		must("final read", c.QueryRow(ctx, "SELECT name FROM users WHERE id = $1", k).Scan(&got))
		if got != name {
			check(fmt.Sprintf("final read of %d", k), false, got)
		}
		keys = append(keys, k)
	}
	c.Close(ctx)
	check(fmt.Sprintf("every key read back (%d)", len(keys)), true, "")
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = strconv.FormatInt(k, 10)
	}
	fmt.Println("keys " + strings.Join(parts, ","))
	fmt.Println("all checks passed")
}
