use super::*;

const GOOD: &str = r#"
[proxy]
listen = "127.0.0.1:6432"
pool_mode = "transaction"

[pool]
size = 10
checkout_timeout = "2s"

[[users]]
name = "app"
password = "secret"
database = "app"

[[shards]]
name = "s0"
primary = { host = "127.0.0.1", port = 5432 }
replicas = [{ host = "127.0.0.1", port = 5433, zone = "a" }]
"#;

fn err(text: &str) -> ConfigError {
    Config::from_toml(text, "test.toml").expect_err("config should be rejected")
}

#[test]
fn parses_good_config_with_defaults() {
    let c = Config::from_toml(GOOD, "test.toml").unwrap();
    assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:6432");
    assert_eq!(c.proxy.pool_mode, PoolMode::Transaction);
    assert_eq!(c.pool.size, 10);
    assert_eq!(c.pool.checkout_timeout, std::time::Duration::from_secs(2));
    assert_eq!(c.users[0].auth, AuthMethod::ScramSha256);
    assert_eq!(c.users[0].server_password(), Some("secret"));
    assert_eq!(c.shards[0].replicas[0].zone.as_deref(), Some("a"));
    assert_eq!(c.shards[0].primary.address(), "127.0.0.1:5432");
}

#[test]
fn example_configs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n > 0);
}

#[test]
fn unknown_key_names_the_table_and_the_key() {
    let e = err(&GOOD.replace("pool_mode =", "pool_mood ="));
    assert_eq!(e.path, "proxy.pool_mood");
    assert!(e.message.contains("unknown field `pool_mood`"), "{e}");
    assert!(e.message.contains("listen"), "lists the expected keys: {e}");
    assert_eq!(e.location.map(|l| l.0), Some(4));
    assert!(
        e.to_string()
            .starts_with("test.toml: proxy.pool_mood: unknown field"),
        "{e}"
    );
}

#[test]
fn wrong_type_names_the_key_path() {
    let e = err(&GOOD.replace("port = 5433", "port = \"5433\""));
    assert_eq!(e.path, "shards[0].replicas[0].port");
    assert!(e.message.contains("invalid type"), "{e}");
    let e = err(&GOOD.replace("size = 10", "size = -1"));
    assert_eq!(e.path, "pool.size");
}

#[test]
fn missing_field() {
    let e = err(&GOOD.replace("database = \"app\"", ""));
    assert_eq!(e.path, "users[0]");
    assert!(e.message.contains("missing field `database`"), "{e}");
}

#[test]
fn bad_address() {
    let e = err(&GOOD.replace("\"127.0.0.1:6432\"", "\"localhost:port\""));
    assert_eq!(e.path, "proxy.listen");
    assert!(
        e.message
            .contains("expected an IP address or `localhost` and a port"),
        "{e}"
    );
    let e = err(&GOOD.replace("port = 5432", "port = 70000"));
    assert_eq!(e.path, "shards[0].primary.port");
    let e = err(&GOOD.replace(
        "host = \"127.0.0.1\", port = 5432",
        "host = \"\", port = 5432",
    ));
    assert_eq!(e.path, "shards[0].primary.host");
}

#[test]
fn bad_duration() {
    let e = err(&GOOD.replace("\"2s\"", "\"2 fortnights\""));
    assert_eq!(e.path, "pool.checkout_timeout");
    assert!(e.message.contains("duration"), "{e}");
}

#[test]
fn bad_enum_value() {
    let e = err(&GOOD.replace("\"transaction\"", "\"statement\""));
    assert_eq!(e.path, "proxy.pool_mode");
    assert!(
        e.message.contains("session"),
        "names the allowed values: {e}"
    );
}

#[test]
fn duplicate_shard() {
    let text = format!(
        "{GOOD}\n[[shards]]\nname = \"s0\"\nprimary = {{ host = \"127.0.0.1\", port = 6000 }}\n"
    );
    let e = err(&text);
    assert_eq!(e.path, "shards[1].name");
    assert!(e.message.contains("duplicate shard \"s0\""), "{e}");
}

#[test]
fn duplicate_node() {
    let text = format!(
        "{GOOD}\n[[shards]]\nname = \"s1\"\nprimary = {{ host = \"127.0.0.1\", port = 5433 }}\n"
    );
    let e = err(&text);
    assert_eq!(e.path, "shards[1].primary");
    assert!(e.message.contains("duplicate node 127.0.0.1:5433"), "{e}");
}

#[test]
fn duplicate_user() {
    let text = format!("{GOOD}\n[[users]]\nname = \"app\"\npassword = \"x\"\ndatabase = \"app\"\n");
    let e = err(&text);
    assert_eq!(e.path, "users[1].name");
    assert!(e.message.contains("duplicate user \"app\""), "{e}");
}

#[test]
fn no_shards_or_users() {
    let e = err("[proxy]\nlisten = \"127.0.0.1:1\"\n[[users]]\nname=\"a\"\ndatabase=\"a\"\nauth=\"trust\"\n");
    assert_eq!(e.path, "shards");
    let e = err("");
    assert_eq!(e.path, "users");
}

#[test]
fn password_must_fit_auth_method() {
    let md5 = "md5".to_string() + &"a".repeat(32);
    let e = err(&GOOD.replace("password = \"secret\"", &format!("password = \"{md5}\"")));
    assert_eq!(e.path, "users[0].password");
    assert!(e.message.contains("cannot verify SCRAM"), "{e}");

    let e = err(&GOOD.replace("password = \"secret\"", ""));
    assert_eq!(e.path, "users[0].password");

    let scram = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy";
    let e = err(&GOOD.replace("password = \"secret\"", &format!("password = \"{scram}\"")));
    assert_eq!(e.path, "users[0].server_password");

    let ok = GOOD.replace(
        "password = \"secret\"",
        &format!("password = \"{scram}\"\nserver_password = \"pw\""),
    );
    Config::from_toml(&ok, "t").unwrap();

    let e = err(&GOOD.replace("password = \"secret\"", "password = \"SCRAM-SHA-256$oops\""));
    assert!(e.message.contains("malformed SCRAM"), "{e}");
}

#[test]
fn tls_needs_both_files() {
    let e = err(&format!("[tls]\ncert = \"a.pem\"\n{GOOD}"));
    assert_eq!(e.path, "tls.key");
}

#[test]
fn toml_syntax_error_has_a_location() {
    let e = err("[proxy\nlisten = 1");
    assert!(e.location.is_some(), "{e}");
}

#[test]
fn password_kinds() {
    assert_eq!(password_kind("hunter2"), PasswordKind::Plain);
    assert_eq!(
        password_kind(&("md5".to_string() + &"0f".repeat(16))),
        PasswordKind::Md5
    );
    assert_eq!(password_kind("md5short"), PasswordKind::Plain);
    assert_eq!(
        password_kind("SCRAM-SHA-256$4096:a$b:c"),
        PasswordKind::Scram
    );
}

#[test]
fn workers_default_to_half_the_cores() {
    let c = Config::from_toml(GOOD, "t").unwrap();
    assert_eq!(c.proxy.workers, 0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    assert_eq!(c.proxy.worker_threads(), cores.div_ceil(2).max(1));
    let c = Config::from_toml(
        &GOOD.replace(
            "pool_mode = \"transaction\"",
            "pool_mode = \"transaction\"\nworkers = 3",
        ),
        "t",
    )
    .unwrap();
    assert_eq!(c.proxy.worker_threads(), 3);
}

#[test]
fn routing_sections_have_defaults_and_are_checked() {
    let c = Config::from_toml(GOOD, "test.toml").unwrap();
    assert_eq!(c.health.interval, std::time::Duration::from_secs(1));
    assert_eq!(
        c.health.max_replica_lag,
        std::time::Duration::from_millis(500)
    );
    assert_eq!(c.load_balancing.strategy, Strategy::RoundRobin);
    assert_eq!(c.load_balancing.read_your_writes, ReadYourWrites::Lsn);
    assert!(c.load_balancing.replica_fallback_to_primary);
    assert!(!c.health.auto_promote);

    let text = format!("{GOOD}\n[load_balancing]\nstrategy = \"least_connections\"\nread_your_writes = \"primary_window\"\nprimary_window = \"2s\"\n");
    let c = Config::from_toml(&text, "test.toml").unwrap();
    assert_eq!(c.load_balancing.strategy, Strategy::LeastConnections);
    assert_eq!(
        c.load_balancing.read_your_writes,
        ReadYourWrites::PrimaryWindow
    );

    let e = err(&format!(
        "{GOOD}\n[load_balancing]\nstrategy = \"fastest\"\n"
    ));
    assert!(e.to_string().contains("load_balancing.strategy"), "{e}");
    let e = err(&format!("{GOOD}\n[health]\ninterval = \"1ms\"\n"));
    assert!(
        e.to_string().contains("health.interval") && e.to_string().contains("10ms"),
        "{e}"
    );
    let e = err(&format!("{GOOD}\n[routing]\nwriting_function = [\"f\"]\n"));
    assert!(e.to_string().contains("routing.writing_function"), "{e}");

    let e = err(&format!("{GOOD}\n[sharding]\ndefault_shard = \"nope\"\n"));
    assert!(
        e.to_string().contains("sharding.default_shard")
            && e.to_string().contains("no shard is named"),
        "{e}"
    );
}

#[test]
fn sharding_is_validated() {
    let two =
        format!("{GOOD}\n[[shards]]\nname = \"s1\"\nprimary = {{ host = \"h\", port = 9 }}\n");
    let c = Config::from_toml(
        &format!("{two}\n[[sharding.tables]]\nname = \"users\"\ncolumn = \"id\"\n"),
        "t",
    )
    .unwrap();
    assert_eq!(c.sharding.function, ShardingFunction::Consistent);
    assert_eq!(c.sharding.vnodes, 256);
    for (extra, path, says) in [
        ("[sharding]\nfunction = \"range\"\n", "sharding.ranges", "at least one range"),
        ("[sharding]\nfunction = \"range\"\nranges = [{ shard = \"s0\", to = 10 }, { shard = \"s1\", from = 5 }]\n", "sharding.ranges[1]", "overlaps"),
        ("[sharding]\nfunction = \"list\"\nlists = [{ shard = \"s9\", values = [1] }]\n", "sharding.lists[0].shard", "no shard is named"),
        ("[sharding]\npinned = [{ key = \"x\", shard = \"s0\" }]\n", "sharding.pinned[0].key", "Bigint"),
        ("[sharding]\nvnodes = 0\n", "sharding.vnodes", "1 to 65536"),
        ("[[sharding.tables]]\nname = \"t\"\ncolumn = \"id\"\ngroup = \"g\"\n", "sharding.tables[0].group", "no [[sharding.groups]]"),
        ("[[sharding.tables]]\nname = \"t\"\ncolumn = \"id\"\n[[reference_tables]]\nname = \"T\"\n", "reference_tables[0].name", "already listed"),
    ] {
        let e = err(&format!("{two}\n{extra}"));
        assert!(e.path == path && e.message.contains(says), "{extra}: {e}");
    }
    let e = err(&GOOD.replace("[[shards]]", "[[shards]]\nweight = 0.0"));
    assert!(e.path.ends_with("weight"), "{e}");
    let e = err(&two.replace("name = \"s1\"", "name = \"s1\"\nweight = -1"));
    assert!(
        e.path == "shards[1].weight" && e.message.contains("0 or more"),
        "{e}"
    );
    // Weight 0: a shard for pinned keys only, on the ring; pg_hash would
    // place keys on it anyway.
    let pinned_only = two.replace("name = \"s1\"", "name = \"s1\"\nweight = 0");
    let c = Config::from_toml(&pinned_only, "t").unwrap();
    assert_eq!(c.shards[1].weight, 0.0);
    let e = err(&format!(
        "{pinned_only}\n[sharding]\nfunction = \"pg_hash\"\n"
    ));
    assert!(
        e.path == "shards[1].weight" && e.message.contains("pg_hash"),
        "{e}"
    );
}

#[test]
fn hot_keys_count_a_minute_by_default() {
    let c = Config::from_toml(GOOD, "t").unwrap();
    assert_eq!(c.hot_keys.window, std::time::Duration::from_secs(60));
    assert_eq!(c.hot_keys.top, 10);
    let c = Config::from_toml(&format!("{GOOD}\n[hot_keys]\nwindow = \"0s\"\n"), "t").unwrap();
    assert!(c.hot_keys.window.is_zero());
    for (extra, path) in [
        ("window = \"10ms\"", "hot_keys.window"),
        ("top = 0", "hot_keys.top"),
        ("top = 101", "hot_keys.top"),
    ] {
        let e = err(&format!("{GOOD}\n[hot_keys]\n{extra}\n"));
        assert_eq!(e.path, path, "{e}");
    }
}

#[test]
fn metrics_are_off_unless_listen_is_set() {
    let c = Config::from_toml(GOOD, "t").unwrap();
    assert_eq!(c.metrics.listen, None);
    let c = Config::from_toml(
        &format!("{GOOD}\n[metrics]\nlisten = \"localhost:9930\"\n"),
        "t",
    )
    .unwrap();
    assert_eq!(
        c.metrics.listen.map(|a| a.to_string()).as_deref(),
        Some("127.0.0.1:9930")
    );
    let e = err(&format!("{GOOD}\n[metrics]\nlisten = \"9930\"\n"));
    assert_eq!(e.path, "metrics.listen", "{e}");
    let e = err(&format!("{GOOD}\n[metrics]\nport = 9930\n"));
    assert!(e.message.contains("listen"), "{e}");
}

#[test]
fn listen_takes_localhost() {
    let c = Config::from_toml(&GOOD.replace("127.0.0.1:6432", "localhost:7000"), "t").unwrap();
    assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:7000");
    let e = err(&GOOD.replace("127.0.0.1:6432", "example.com:7000"));
    assert!(e.to_string().contains("localhost"), "{e}");
}

#[test]
fn a_server_ca_without_server_tls_is_refused() {
    let text = GOOD.replace("size = 10", "size = 10\nserver_tls_ca = \"/ca.pem\"");
    let e = err(&text);
    assert_eq!(e.path, "pool.server_tls_ca", "{e}");
    let ok = text.replace("size = 10", "size = 10\nserver_tls = \"require\"");
    Config::from_toml(&ok, "t").unwrap();
}

#[test]
fn errors_about_the_whole_file_name_no_key_path() {
    let e = Config::load(std::path::Path::new("/nonexistent/shardline.toml")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/shardline.toml: cannot read file"),
        "{e}"
    );
}

#[test]
fn required_client_tls_needs_a_certificate() {
    let text = format!("{GOOD}\n[tls]\nmode = \"require\"\n");
    let e = err(&text);
    assert_eq!(e.path, "tls.mode", "{e}");
    let ok = format!("{GOOD}\n[tls]\nmode = \"require\"\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n");
    let c = Config::from_toml(&ok, "t").unwrap();
    assert_eq!(c.tls.mode, crate::ClientTlsMode::Require);
    assert_eq!(
        Config::from_toml(GOOD, "t").unwrap().tls.mode,
        crate::ClientTlsMode::Allow
    );
}

#[test]
fn admin_console_is_off_by_default_and_its_users_must_exist() {
    let c = Config::from_toml(GOOD, "test.toml").unwrap();
    assert!(c.admin.users.is_empty());
    assert_eq!(c.admin.database, "shardline");
    let on = format!("{GOOD}\n[admin]\nusers = [\"app\"]\nmax_hold = \"5s\"\n");
    let c = Config::from_toml(&on, "test.toml").unwrap();
    assert_eq!(c.admin.users, ["app"]);
    assert_eq!(c.admin.max_hold, std::time::Duration::from_secs(5));

    let e = err(&format!("{GOOD}\n[admin]\nusers = [\"ops\"]\n"));
    assert_eq!(e.path, "admin.users[0]");
    assert!(
        e.message.contains("no [[users]] entry is named \"ops\""),
        "{e}"
    );
    let e = err(&format!("{GOOD}\n[admin]\ndatabase = \"app\"\n"));
    assert_eq!(e.path, "admin.database");
    assert!(
        e.message.contains("also the database of user \"app\""),
        "{e}"
    );
    let e = err(&format!("{GOOD}\n[admin]\npause_timeout = \"0s\"\n"));
    assert_eq!(e.path, "admin.pause_timeout");
}

#[test]
fn the_placement_fingerprint_changes_with_the_placement_only() {
    let a = Config::from_toml(GOOD, "a.toml").unwrap();
    let pool = Config::from_toml(&GOOD.replace("size = 10", "size = 11"), "b.toml").unwrap();
    assert_eq!(a.placement_fingerprint(), pool.placement_fingerprint());
    assert_eq!(a.placement_fingerprint().len(), 16);
    let more = format!(
        "{GOOD}\n[[shards]]\nname = \"s1\"\nprimary = {{ host = \"127.0.0.1\", port = 6000 }}\n"
    );
    let b = Config::from_toml(&more, "c.toml").unwrap();
    assert_ne!(a.placement_fingerprint(), b.placement_fingerprint());
}
