//! The monitoring endpoints over real HTTP: `/metrics` scraped during a
//! pgbench load on two shards (counters move, histograms fill, and
//! Debian's `promtool check metrics` accepts the output), `/health`, and
//! `/ready` going to 503 naming the shard whose primary is stopped; the
//! slow-statement log of the proxy binary.

use shardline_tests::{wait_for, Env, EnvOptions, ProxyProcess, TempDir};
use std::collections::HashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;

const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

/// One HTTP/1.0 request (the connection closes after the answer): the
/// status code, the headers (lower-case names) and the body.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
) -> (u16, HashMap<String, String>, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the metrics port");
    tcp.write_all(format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .expect("request sent");
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.expect("response read");
    let text = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// A sample's value: `name` with exactly these labels (in the order the
/// proxy writes them), or 0 when there is no such sample yet.
fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want = if labels.is_empty() {
        name.to_string()
    } else {
        let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        format!("{name}{{{}}}", inner.join(","))
    };
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == want).then(|| value.parse().expect("a number"))
        })
        .unwrap_or(0.0)
}

/// The sum of every sample of `name` (whatever its labels).
fn total(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

async fn two_shards() -> (Env, std::net::SocketAddr) {
    let env = Env::demo_sharded(METRICS).await;
    let addr = env
        .proxy
        .as_ref()
        .and_then(|p| p.metrics_addr)
        .expect("the proxy serves metrics");
    (env, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_under_load_and_pass_promtool() {
    let (env, addr) = two_shards().await;
    let c = env.connect().await;
    c.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .expect("a table on both shards");
    let rows: Vec<String> = (1..=200).map(|i| format!("({i}, 'u{i}')")).collect();
    c.batch_execute(&format!(
        "INSERT INTO users (id, name) VALUES {}",
        rows.join(", ")
    ))
    .await
    .expect("rows on both shards");

    // A transaction writing on both shards commits in two phases.
    c.batch_execute("BEGIN").await.expect("BEGIN");
    for id in 1..=20 {
        c.batch_execute(&format!("UPDATE users SET name = 'w' WHERE id = {id}"))
            .await
            .expect("an update in the transaction");
    }
    c.batch_execute("COMMIT")
        .await
        .expect("a transaction on both shards");

    // Refusals (0A000) by construct: one the router makes (a UNION over
    // a sharded table), one the session makes (a READ ONLY transaction
    // reaching a second shard).
    let e = c
        .simple_query("SELECT id FROM users UNION SELECT id FROM users")
        .await
        .expect_err("a UNION across shards is refused");
    assert_eq!(e.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{e}");
    c.batch_execute("BEGIN READ ONLY").await.expect("BEGIN");
    let mut refused = None;
    for id in 1..=20 {
        if let Err(e) = c
            .simple_query(&format!("SELECT name FROM users WHERE id = {id}"))
            .await
        {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("a read-only transaction keeps to one shard");
    assert_eq!(e.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{e}");
    c.batch_execute("ROLLBACK").await.expect("ROLLBACK");

    let (status, headers, before) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 200, "{before}");
    assert_eq!(
        headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let app = [("user", "app"), ("database", "app")];
    let queries_before = sample(&before, "shardline_queries_total", &app);

    // Reads by key (one shard, a replica), writes by key (a primary), and
    // a keyless count (merged by the proxy), over 8 clients.
    let dir = TempDir::new("metrics-bench");
    let script = dir.write(
        "mix.sql",
        "\\set id random(1, 200)\nSELECT name FROM users WHERE id = :id;\nBEGIN;\nUPDATE users SET name = 'v' || :id WHERE id = :id;\nCOMMIT;\nSELECT count(*) FROM users;\n",
    );
    let bench = shardline_tests::pgbench_script(env.port, 8, 3, &script);
    // Errors reach clients: a missing table (class 42) and a division by
    // zero (class 22).
    for sql in ["SELECT * FROM no_such_table", "SELECT 1 / 0"] {
        let e = c.simple_query(sql).await.expect_err(sql);
        assert!(e.as_db_error().is_some(), "{sql}: {e}");
    }
    // Scraped during the load: the counters already move.
    wait_for("queries counted during the load", || async {
        let (_, _, body) = http(addr, "GET", "/metrics").await;
        sample(&body, "shardline_queries_total", &app) > queries_before + 100.0
    })
    .await;
    let (ok, out) = bench.join().expect("pgbench thread");
    assert!(ok, "pgbench: {out}");
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let done: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|l| l.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .expect("pgbench's count");

    let (_, _, after) = http(addr, "GET", "/metrics").await;
    // Each pgbench transaction is five units (three statements alone,
    // BEGIN-UPDATE-COMMIT as three more in one transaction: 5 queries, 3
    // transactions).
    let queries = sample(&after, "shardline_queries_total", &app) - queries_before;
    assert!(
        queries >= done * 5.0,
        "{queries} units for {done} pgbench transactions"
    );
    let xacts = sample(&after, "shardline_transactions_total", &app);
    assert!(xacts >= done * 3.0, "{xacts} transactions for {done}");
    let hist =
        |name: &str, labels: &[(&str, &str)]| sample(&after, &format!("{name}_count"), labels);
    assert!(hist("shardline_transaction_duration_seconds", &app) >= done * 3.0);
    assert_eq!(
        hist("shardline_query_duration_seconds", &app),
        sample(&after, "shardline_queries_total", &app),
        "every unit counted is in the histogram"
    );
    // Buckets are cumulative and end at the count.
    let inf = sample(
        &after,
        "shardline_query_duration_seconds_bucket",
        &[("user", "app"), ("database", "app"), ("le", "+Inf")],
    );
    let ms = sample(
        &after,
        "shardline_query_duration_seconds_bucket",
        &[("user", "app"), ("database", "app"), ("le", "0.001")],
    );
    assert_eq!(inf, hist("shardline_query_duration_seconds", &app));
    assert!(ms <= inf);
    for (shard, role) in [
        ("s0", "primary"),
        ("s0", "replica"),
        ("s1", "primary"),
        ("s1", "replica"),
    ] {
        let n = hist(
            "shardline_shard_query_duration_seconds",
            &[("shard", shard), ("role", role)],
        );
        assert!(n > 0.0, "units on {shard} {role}: {n}");
    }
    let merged = hist(
        "shardline_placement_query_duration_seconds",
        &[("placement", "merge")],
    );
    assert!(merged >= done, "merged units {merged} for {done}");
    assert!(
        sample(
            &after,
            "shardline_units_placed_total",
            &[("placement", "merge")]
        ) >= done
    );
    assert!(sample(&after, "shardline_errors_total", &[("class", "42")]) >= 1.0);
    for construct in ["set_operation", "transaction"] {
        let n = sample(
            &after,
            "shardline_refusals_total",
            &[("construct", construct)],
        );
        assert_eq!(n, 1.0, "{construct} refusals");
    }
    assert_eq!(total(&after, "shardline_refusals_total"), 2.0);
    assert!(sample(&after, "shardline_errors_total", &[("class", "0A")]) >= 2.0);
    assert!(sample(&after, "shardline_errors_total", &[("class", "22")]) >= 1.0);
    assert!(total(&after, "shardline_pool_checkouts_total") >= done);
    assert!(total(&after, "shardline_pool_checkout_wait_seconds_count") >= done);
    // The pools opened their connections (none failed, none opening now),
    // and every node's health checks are timed.
    assert!(total(&after, "shardline_pool_server_connections_opened_total") >= 4.0);
    assert_eq!(
        total(&after, "shardline_pool_server_connect_failures_total"),
        0.0
    );
    assert!(after.contains("shardline_pool_server_connections_opening{"));
    for line in after
        .lines()
        .filter(|l| l.starts_with("shardline_node_up{"))
    {
        let labels = &line[line.find('{').unwrap() + 1..line.find('}').unwrap()];
        let count = format!("shardline_node_health_check_duration_seconds_count{{{labels}}}");
        assert!(
            sample(&after, &count, &[]) > 0.0,
            "no health check timed for {labels}"
        );
    }
    assert!(sample(&after, "shardline_router_statements_total", &[]) > 0.0);
    assert!(sample(&after, "shardline_router_cache_hits_total", &[]) > 0.0);
    assert!(sample(&after, "shardline_router_route_duration_seconds_count", &[]) > 0.0);
    for outcome in ["prepared", "committed"] {
        assert_eq!(
            sample(&after, "shardline_two_phase_total", &[("outcome", outcome)]),
            1.0,
            "{outcome}"
        );
    }
    assert_eq!(
        sample(
            &after,
            "shardline_two_phase_total",
            &[("outcome", "in_doubt")]
        ),
        0.0
    );
    // The hot-key report: the top keys of the default group (keys of 1 to
    // 200, each read and updated), and each shard's share of keyed traffic.
    let top: Vec<&str> = after
        .lines()
        .filter(|l| l.starts_with("shardline_hot_key_statements{"))
        .collect();
    assert_eq!(top.len(), 10, "hot_keys.top keys: {top:?}");
    assert!(
        top.iter().all(|l| l.contains("table_group=\"default\"")),
        "{top:?}"
    );
    let keyed = total(&after, "shardline_shard_keyed_statements");
    assert!(keyed >= done * 2.0, "{keyed} keyed statements for {done}");
    for shard in ["s0", "s1"] {
        assert!(
            sample(
                &after,
                "shardline_shard_keyed_statements",
                &[("shard", shard)]
            ) > 0.0
        );
    }
    let shares = total(&after, "shardline_shard_traffic_share");
    assert!((shares - 1.0).abs() < 1e-9, "shares add up to 1: {shares}");
    assert!(sample(&after, "shardline_hot_keys_window_seconds", &[]) > 0.0);
    assert!(sample(&after, "shardline_resident_memory_bytes", &[]) > 1e6);
    assert_eq!(total(&after, "shardline_node_up"), 4.0, "{after}");
    assert_eq!(total(&after, "shardline_node_banned"), 0.0);
    assert!(after.contains("shardline_node_replay_lag_bytes{shard=\"s0\""));
    // pgbench's clients leave; only `c` stays logged in.
    wait_for("one client left", || async {
        let (_, _, body) = http(addr, "GET", "/metrics").await;
        sample(&body, "shardline_client_connections", &app) == 1.0
    })
    .await;

    // Prometheus's own checker reads it as valid exposition with no lint.
    let file = dir.write("metrics.txt", &after);
    let (ok, out) = shardline_tests::run(
        std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&file).expect("the scrape")),
    );
    assert!(ok, "promtool check metrics: {out}");
    dashboard_queries_exist(&after);
}

/// Every metric the Grafana dashboard (docker/grafana/shardline.json)
/// queries is one the proxy exposes: a renamed metric breaks this test,
/// not the operators' charts.
fn dashboard_queries_exist(scrape: &str) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docker/grafana/shardline.json"
    );
    let text = std::fs::read_to_string(path).expect("the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    fn exprs<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e),
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(all.len() >= 20, "{} queries", all.len());
    let mut names = std::collections::BTreeSet::new();
    for e in &all {
        let mut rest = *e;
        while let Some(at) = rest.find("shardline_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name)
                .to_string();
            names.insert(family);
        }
    }
    for name in &names {
        assert!(
            scrape.contains(&format!("# TYPE {name} ")),
            "the dashboard queries {name}, which the proxy does not expose"
        );
    }
    assert!(names.len() >= 30, "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_ready_say_what_is_missing() {
    let (env, addr) = two_shards().await;
    let (status, _, body) = http(addr, "GET", "/health").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, headers, body) = http(addr, "GET", "/ready").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body, r#"{"ready":true}"#);
    let (status, _, _) = http(addr, "GET", "/nothing").await;
    assert_eq!(status, 404);
    let (status, headers, _) = http(addr, "POST", "/metrics").await;
    assert_eq!((status, headers["allow"].as_str()), (405, "GET, HEAD"));

    // s1's primary stops: the proxy still serves (/health) but is not
    // ready, and says which shard lacks what.
    let nodes = env.backend.nodes();
    let s1 = nodes
        .iter()
        .position(|n| n.shard == "s1" && n.is_primary)
        .expect("s1's primary");
    env.backend.stop_node(s1, "immediate").expect("stopped");
    wait_for("/ready to answer 503", || async {
        http(addr, "GET", "/ready").await.0 == 503
    })
    .await;
    let (_, _, body) = http(addr, "GET", "/ready").await;
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(json["ready"], false, "{body}");
    let missing = json["shards_without_primary"].as_array().expect("a list");
    assert_eq!(missing.len(), 1, "{body}");
    assert_eq!(missing[0]["shard"], "s1", "{body}");
    let port = nodes[s1].port.to_string();
    assert!(
        missing[0]["problem"].as_str().unwrap_or("").contains(&port),
        "names the primary: {body}"
    );
    assert_eq!(http(addr, "GET", "/health").await.0, 200);
    let (_, _, metrics) = http(addr, "GET", "/metrics").await;
    assert_eq!(total(&metrics, "shardline_node_up"), 3.0, "{metrics}");

    env.backend.start_node(s1).expect("started again");
    wait_for("/ready to answer 200 again", || async {
        http(addr, "GET", "/ready").await.0 == 200
    })
    .await;
}

/// A statement over `log.slow_statement` is logged once with its shape
/// (no constant), where it ran and the trace context its sqlcommenter
/// comment carried; statements under the bound are not logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_statements_are_logged_with_shape_place_and_trace() {
    let env = Env::start_with(EnvOptions {
        shards: 2,
        replicas_per_shard: 0,
        ..EnvOptions::default()
    })
    .await
    .expect("two shards");
    let config = env.shards_config(
        &[0, 1],
        "[[sharding.tables]]\nname = \"users\"\ncolumn = \"id\"\n\n[log]\nslow_statement = \"300ms\"\n",
    );
    let (proxy, c) = ProxyProcess::start(&config, &[]).await;
    c.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
        .await
        .expect("a table on both shards");
    c.batch_execute("INSERT INTO users (id, name) VALUES (42, 'a'), (7, 'b')")
        .await
        .expect("rows (pg_sleep runs once per row read)");
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    c.batch_execute(&format!(
        "SELECT pg_sleep(0.4), name FROM users WHERE id = 42 AND name <> 'secret-value' /*controller='orders',traceparent='{trace}'*/"
    ))
    .await
    .expect("a slow read");
    c.batch_execute("SELECT name FROM users WHERE id = 7")
        .await
        .expect("a fast read");
    proxy.log.wait_for("slow statement").await;
    // The fast read's ReadyForQuery went out after the slow one's line.
    let log = proxy.log.text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("slow statement"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    let line = lines[0];
    for want in [
        "SELECT pg_sleep(0), name FROM users WHERE id = 0 AND name <> '' /**/",
        &format!("traceparent=\"{trace}\""),
        "placement=\"one_shard\"",
        "role=\"primary\"",
        "node=\"127.0.0.1:",
        "user=app",
    ] {
        assert!(line.contains(want), "{want} in {line}");
    }
    assert!(
        !line.contains("secret-value") && !line.contains("id = 42"),
        "{line}"
    );
    assert!(
        line.contains("shard=\"s0\"") || line.contains("shard=\"s1\""),
        "{line}"
    );
    // Other lines about a statement carry its trace too: here the one
    // saying a temporary table keeps the client's server connection.
    let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    c.batch_execute(&format!(
        "/* shardline: shard=s0 */ CREATE TEMP TABLE scratch (x int) /*traceparent='{other}'*/"
    ))
    .await
    .expect("a temporary table");
    proxy.log.wait_for("keeps its server connection").await;
    let log = proxy.log.text();
    let line = log
        .lines()
        .find(|l| l.contains("keeps its server connection"))
        .expect("the line");
    assert!(line.contains(&format!("traceparent=\"{other}\"")), "{line}");
}
