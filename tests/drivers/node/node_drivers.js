// node-postgres against a two-shard Shardline: named queries (a named Parse
// and its Bind in one unit on first use), unnamed parameterized queries,
// pg-cursor inside a transaction on one key, a migration sent as one query
// string (DDL and seed rows across shards), and a pool of 20 clients
// running 200 queries each. Every key written is read back; the caller
// audits each row's physical shard.
//
// Usage: node node_drivers.js URL BASE   (keys BASE .. BASE+999 free)
'use strict';
const { Client, Pool } = require('pg');
const Cursor = require('pg-cursor');

function check(name, cond, detail) {
  if (!cond) throw new Error(`${name}: ${detail === undefined ? '' : JSON.stringify(detail)}`);
  console.log(`ok ${name}`);
}

async function main() {
  const [url, baseArg] = process.argv.slice(2);
  const base = Number(baseArg);
  const names = new Map();
  const c = new Client({ connectionString: url });
  await c.connect();
  // Named queries: prepared on first execution, bound alone afterwards.
  for (let k = base; k < base + 40; k++) {
    await c.query({ name: 'ins', text: 'INSERT INTO users (id, name) VALUES ($1, $2)', values: [k, `named ${k}`] });
    names.set(k, `named ${k}`);
  }
  for (let k = base; k < base + 40; k++) {
    const r = await c.query({ name: `sel${k % 3}`, text: 'SELECT name FROM users WHERE id = $1', values: [k] });
    if (r.rows.length !== 1 || r.rows[0].name !== names.get(k)) throw new Error(`named read ${k}: ${JSON.stringify(r.rows)}`);
  }
  check('named queries write and read by key', true);
  // Unnamed parameterized queries.
  for (let k = base + 40; k < base + 80; k++) {
    await c.query('INSERT INTO users (id, name) VALUES ($1, $2)', [k, `unnamed ${k}`]);
    names.set(k, `unnamed ${k}`);
    const r = await c.query('SELECT name FROM users WHERE id = $1', [k]);
    if (r.rows.length !== 1 || r.rows[0].name !== `unnamed ${k}`) throw new Error(`read ${k}`);
  }
  check('unnamed queries write and read by key', true);
  // A cross-shard count, merged.
  const n = await c.query('SELECT count(*) AS n FROM users WHERE id BETWEEN $1 AND $2', [base, base + 79]);
  check('merged count across shards', Number(n.rows[0].n) === 80, n.rows);
  // pg-cursor in a transaction on one key (Execute with a row limit).
  await c.query('BEGIN');
  const cursor = c.query(new Cursor('SELECT id, name FROM users WHERE id = $1', [base + 5]));
  const first = await new Promise((res, rej) => cursor.read(10, (e, rows) => (e ? rej(e) : res(rows))));
  await new Promise((res) => cursor.close(res));
  await c.query('COMMIT');
  check('pg-cursor in a transaction', first.length === 1 && Number(first[0].id) === base + 5, first);
  // pg-cursor over several shards (Bind of a named portal, Execute with a
  // row limit, Flush): refused as a cursor, never one shard's rows.
  const spread = c.query(new Cursor('SELECT id FROM users WHERE id BETWEEN $1 AND $2', [base, base + 79]));
  const refused = await new Promise((res) => spread.read(5, (e, rows) => res(e ? e : rows)));
  check('pg-cursor over several shards is refused',
    refused instanceof Error && refused.code === '0A000' && /cursor/.test(refused.message), refused);
  await new Promise((res) => spread.close(res));
  // A transaction rolled back leaves nothing.
  await c.query('BEGIN');
  await c.query('INSERT INTO users (id, name) VALUES ($1, $2)', [base + 90, 'gone']);
  await c.query('ROLLBACK');
  const gone = await c.query('SELECT name FROM users WHERE id = $1', [base + 90]);
  check('rollback', gone.rows.length === 0, gone.rows);
  // A migration as one query string (no parameters: the simple protocol):
  // its DDL on every shard, its seed rows on their keys' shards.
  const seed = [91, 92, 93, 94, 95, 96].map((i) => base + i);
  const migrated = await c.query(
    'CREATE TABLE IF NOT EXISTS node_migration (id bigint PRIMARY KEY); ' +
      seed.map((k) => `INSERT INTO users (id, name) VALUES (${k}, 'seed ${k}');`).join(' ') +
      ' ALTER TABLE node_migration ADD COLUMN IF NOT EXISTS at int'
  );
  for (const k of seed) names.set(k, `seed ${k}`);
  const seeded = await c.query('SELECT count(*) AS n FROM users WHERE id BETWEEN $1 AND $2', [seed[0], seed[5]]);
  check('migration string: DDL and seed rows across shards',
    migrated.length === 8 && migrated[0].command === 'CREATE' && Number(seeded.rows[0].n) === 6,
    [migrated.map((r) => r.command), seeded.rows]);
  await c.end();

  // A pool of 20 clients, 200 queries each: writes and reads by key.
  const pool = new Pool({ connectionString: url, max: 20 });
  const workers = [];
  for (let w = 0; w < 20; w++) {
    workers.push((async () => {
      for (let i = 0; i < 200; i++) {
        const k = base + 100 + w * 40 + (i % 40);
        if (i < 40) {
          await pool.query({ name: 'pool_ins', text: 'INSERT INTO users (id, name) VALUES ($1, $2)', values: [k, `pool ${k}`] });
        } else {
          const r = await pool.query({ name: 'pool_sel', text: 'SELECT name FROM users WHERE id = $1', values: [k] });
          if (r.rows.length !== 1 || r.rows[0].name !== `pool ${k}`) throw new Error(`pool read ${k}: ${JSON.stringify(r.rows)}`);
        }
      }
    })());
  }
  await Promise.all(workers);
  for (let w = 0; w < 20; w++) for (let j = 0; j < 40; j++) names.set(base + 100 + w * 40 + j, `pool ${base + 100 + w * 40 + j}`);
  await pool.end();
  check('pool of 20 x 200 queries', true);
  console.log('keys ' + [...names.keys()].sort((a, b) => a - b).join(','));
  console.log('all checks passed');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
