//! Checks that the types alone cannot express.

use crate::{
    password_kind, AuthMethod, Config, ConfigError, KeyLiteral, KeyType, PasswordKind,
    ShardingFunction,
};
use std::collections::HashSet;

pub(crate) fn validate(c: &Config, file: &str) -> Result<(), ConfigError> {
    let err = |path: String, msg: String| Err(ConfigError::new(file, path, msg));

    if c.proxy.max_message_size < 1024 {
        return err(
            "proxy.max_message_size".into(),
            format!(
                "expected at least 1024 bytes, found {}",
                c.proxy.max_message_size
            ),
        );
    }
    if c.health.interval < std::time::Duration::from_millis(10) {
        return err(
            "health.interval".into(),
            format!("expected at least 10ms, found {:?}", c.health.interval),
        );
    }
    if c.health.timeout.is_zero() {
        return err(
            "health.timeout".into(),
            "expected a positive duration".into(),
        );
    }
    if c.pool.size == 0 {
        return err("pool.size".into(), "expected at least 1".into());
    }
    if c.pool.server_tls_ca.is_some() && c.pool.server_tls == crate::ServerTlsMode::Disable {
        return err(
            "pool.server_tls_ca".into(),
            "set, but pool.server_tls = \"disable\" sends nothing over TLS: set server_tls to \"require\" (or \"prefer\") to verify servers with this CA, or remove server_tls_ca".into(),
        );
    }
    match (&c.tls.cert, &c.tls.key) {
        (Some(_), None) => {
            return err(
                "tls.key".into(),
                "missing: tls.cert is set, so tls.key must be set too".into(),
            )
        }
        (None, Some(_)) => {
            return err(
                "tls.cert".into(),
                "missing: tls.key is set, so tls.cert must be set too".into(),
            )
        }
        (None, None) if c.tls.mode == crate::ClientTlsMode::Require => {
            return err(
                "tls.mode".into(),
                "\"require\" needs tls.cert and tls.key: without them no client could connect"
                    .into(),
            )
        }
        _ => {}
    }

    if c.users.is_empty() {
        return err(
            "users".into(),
            "expected at least one [[users]] entry; nobody could connect".into(),
        );
    }
    let mut names = HashSet::new();
    for (i, u) in c.users.iter().enumerate() {
        let path = |k: &str| format!("users[{i}].{k}");
        if u.name.is_empty() {
            return err(path("name"), "expected a non-empty user name".into());
        }
        if u.database.is_empty() {
            return err(
                path("database"),
                "expected a non-empty database name".into(),
            );
        }
        if !names.insert((&u.name, &u.database)) {
            return err(
                path("name"),
                format!(
                    "duplicate user \"{}\" for database \"{}\": each user and database pair may appear once",
                    u.name, u.database
                ),
            );
        }
        if u.pool_size == Some(0) {
            return err(path("pool_size"), "expected at least 1".into());
        }
        let kind = u.password.as_deref().map(password_kind);
        match (u.auth, kind) {
            (AuthMethod::ScramSha256, None) | (AuthMethod::Md5, None) => {
                return err(
                    path("password"),
                    format!("missing: user \"{}\" authenticates with a password (auth = \"{}\"); set password or use auth = \"trust\"", u.name, auth_name(u.auth)),
                )
            }
            (AuthMethod::ScramSha256, Some(PasswordKind::Md5)) => {
                return err(path("password"), "an md5 hash cannot verify SCRAM-SHA-256: give the plain password or a SCRAM-SHA-256 verifier, or set auth = \"md5\"".into())
            }
            (AuthMethod::Md5, Some(PasswordKind::Scram)) => {
                return err(path("password"), "a SCRAM-SHA-256 verifier cannot verify md5: give the plain password or an md5 hash, or set auth = \"scram-sha-256\"".into())
            }
            _ => {}
        }
        if let Some(p) = u.password.as_deref() {
            if password_kind(p) == PasswordKind::Scram && parse_scram_shape(p).is_none() {
                return err(path("password"), "malformed SCRAM-SHA-256 verifier: expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>".into());
            }
        }
        if u.auth != AuthMethod::Trust
            && u.server_password().is_none()
            && kind != Some(PasswordKind::Plain)
        {
            return err(
                path("server_password"),
                "missing: password is a hash, so the proxy needs server_password to log in to the servers".into(),
            );
        }
    }

    if c.shards.is_empty() {
        return err(
            "shards".into(),
            "expected at least one [[shards]] entry".into(),
        );
    }
    let mut shard_names = HashSet::new();
    let mut nodes = HashSet::new();
    for (i, s) in c.shards.iter().enumerate() {
        if s.name.is_empty() {
            return err(
                format!("shards[{i}].name"),
                "expected a non-empty shard name".into(),
            );
        }
        if !shard_names.insert(&s.name) {
            return err(
                format!("shards[{i}].name"),
                format!("duplicate shard \"{}\": shard names must be unique", s.name),
            );
        }
        let all = std::iter::once(("primary".to_string(), &s.primary)).chain(
            s.replicas
                .iter()
                .enumerate()
                .map(|(j, r)| (format!("replicas[{j}]"), r)),
        );
        for (key, n) in all {
            let path = format!("shards[{i}].{key}");
            if n.host.trim().is_empty() || n.host.contains(char::is_whitespace) {
                return err(
                    format!("{path}.host"),
                    format!("expected a host name or IP address, found \"{}\"", n.host),
                );
            }
            if n.port == 0 {
                return err(
                    format!("{path}.port"),
                    "expected a port from 1 to 65535, found 0".into(),
                );
            }
            if !nodes.insert((n.host.clone(), n.port)) {
                return err(
                    path,
                    format!(
                        "duplicate node {}: a server may appear once in the whole config",
                        n.address()
                    ),
                );
            }
        }
    }
    if c.shards.len() > 64 {
        return err(
            "shards".into(),
            format!("at most 64 shards are supported, found {}", c.shards.len()),
        );
    }
    for (i, s) in c.shards.iter().enumerate() {
        if !(s.weight.is_finite() && s.weight >= 0.0) {
            return err(
                format!("shards[{i}].weight"),
                format!("expected a number of 0 or more, found {}", s.weight),
            );
        }
    }
    if !c.shards.is_empty() && c.shards.iter().all(|s| s.weight == 0.0) {
        return err(
            "shards[0].weight".into(),
            "every shard has weight 0: at least one must own part of the key space".into(),
        );
    }
    let hk = &c.hot_keys;
    if !hk.window.is_zero() && hk.window < std::time::Duration::from_secs(1) {
        return err(
            "hot_keys.window".into(),
            format!("expected 0 (off) or at least 1s, found {:?}", hk.window),
        );
    }
    if !(1..=100).contains(&hk.top) {
        return err(
            "hot_keys.top".into(),
            format!("expected 1 to 100, found {}", hk.top),
        );
    }
    validate_cache(c, file)?;
    validate_admin(c, file)?;
    validate_sharding(c, file)
}

fn validate_cache(c: &Config, file: &str) -> Result<(), ConfigError> {
    let err = |path: String, msg: String| Err(ConfigError::new(file, path, msg));
    let cache = &c.cache;
    if cache.max_entries == 0 {
        return err("cache.max_entries".into(), "expected at least 1".into());
    }
    if cache.max_result_bytes > cache.max_bytes {
        return err(
            "cache.max_result_bytes".into(),
            format!(
                "{} is more than cache.max_bytes ({}): no such result could be kept",
                cache.max_result_bytes, cache.max_bytes
            ),
        );
    }
    let mut seen = std::collections::HashSet::new();
    for (i, t) in cache.tables.iter().enumerate() {
        let name = t.name.trim().to_ascii_lowercase();
        if name.is_empty() || name.split('.').count() > 2 || name.split('.').any(str::is_empty) {
            return err(
                format!("cache.tables[{i}].name"),
                format!(
                    "expected a table name (\"t\" or \"schema.t\"), found \"{}\"",
                    t.name
                ),
            );
        }
        if t.ttl.is_zero() {
            return err(
                format!("cache.tables[{i}].ttl"),
                "expected a duration above 0 (remove the table to stop caching it)".into(),
            );
        }
        if !seen.insert(name) {
            return err(
                format!("cache.tables[{i}].name"),
                format!("\"{}\" is listed twice", t.name),
            );
        }
    }
    Ok(())
}

fn validate_admin(c: &Config, file: &str) -> Result<(), ConfigError> {
    let err = |path: String, msg: String| Err(ConfigError::new(file, path, msg));
    let a = &c.admin;
    if a.database.is_empty() {
        return err(
            "admin.database".into(),
            "expected a non-empty database name".into(),
        );
    }
    if let Some(u) = c.users.iter().find(|u| u.database == a.database) {
        return err(
            "admin.database".into(),
            format!(
                "\"{}\" is also the database of user \"{}\": the console would hide it; name the console's database otherwise",
                a.database, u.name
            ),
        );
    }
    for (i, name) in a.users.iter().enumerate() {
        if !c.users.iter().any(|u| &u.name == name) {
            let known: Vec<&str> = c.users.iter().map(|u| u.name.as_str()).collect();
            return err(
                format!("admin.users[{i}]"),
                format!(
                    "no [[users]] entry is named \"{name}\" (users: {}): an admin logs in with a user's secret",
                    known.join(", ")
                ),
            );
        }
    }
    for (key, d) in [
        ("pause_timeout", a.pause_timeout),
        ("max_hold", a.max_hold),
        ("stats_period", a.stats_period),
    ] {
        if d.is_zero() {
            return err(
                format!("admin.{key}"),
                "expected a positive duration".into(),
            );
        }
    }
    Ok(())
}

fn validate_sharding(c: &Config, file: &str) -> Result<(), ConfigError> {
    let err = |path: String, msg: String| Err(ConfigError::new(file, path, msg));
    let sh = &c.sharding;
    let shard_exists = |name: &str| c.shards.iter().any(|s| s.name == name);
    let no_shard = |name: &str| {
        let known: Vec<&str> = c.shards.iter().map(|s| s.name.as_str()).collect();
        format!(
            "no shard is named \"{name}\" (shards: {})",
            known.join(", ")
        )
    };
    if let Some(d) = &sh.default_shard {
        if !shard_exists(d) {
            return err("sharding.default_shard".into(), no_shard(d));
        }
    }
    let mut groups = vec![("sharding".to_string(), sh.default_group())];
    let mut group_names = HashSet::new();
    for (i, g) in sh.groups.iter().enumerate() {
        if g.name.is_empty() || !group_names.insert(g.name.as_str()) {
            return err(
                format!("sharding.groups[{i}].name"),
                format!(
                    "expected a unique, non-empty group name, found \"{}\"",
                    g.name
                ),
            );
        }
        groups.push((format!("sharding.groups[{i}]"), g.clone()));
    }
    let pinned_only = c.shards.iter().position(|s| s.weight == 0.0);
    for (path, g) in &groups {
        if let (Some(i), ShardingFunction::PgHash) = (pinned_only, g.function) {
            return err(
                format!("shards[{i}].weight"),
                format!(
                    "weight 0 (a shard for pinned keys only) needs the consistent function, and {path}.function is pg_hash, which places keys on every shard"
                ),
            );
        }
        if g.vnodes == 0 || g.vnodes > 65536 {
            return err(
                format!("{path}.vnodes"),
                format!("expected 1 to 65536, found {}", g.vnodes),
            );
        }
        let key_fits = |k: &KeyLiteral| match (g.key_type, k) {
            (KeyType::Bigint, KeyLiteral::Int(_)) => true,
            (KeyType::Text, KeyLiteral::Text(_)) => true,
            (KeyType::Uuid, KeyLiteral::Text(t)) => is_uuid(t),
            _ => false,
        };
        for (j, p) in g.pinned.iter().enumerate() {
            if !shard_exists(&p.shard) {
                return err(format!("{path}.pinned[{j}].shard"), no_shard(&p.shard));
            }
            if !key_fits(&p.key) {
                return err(
                    format!("{path}.pinned[{j}].key"),
                    format!("expected a {:?} key, found {:?}", g.key_type, p.key),
                );
            }
        }
        match g.function {
            ShardingFunction::Range => {
                if g.key_type != KeyType::Bigint {
                    return err(
                        format!("{path}.key_type"),
                        "function = \"range\" needs integer keys (key_type = \"bigint\")".into(),
                    );
                }
                if g.ranges.is_empty() {
                    return err(
                        format!("{path}.ranges"),
                        "function = \"range\" needs at least one range".into(),
                    );
                }
                for (j, r) in g.ranges.iter().enumerate() {
                    if !shard_exists(&r.shard) {
                        return err(format!("{path}.ranges[{j}].shard"), no_shard(&r.shard));
                    }
                    if let (Some(f), Some(t)) = (r.from, r.to) {
                        if f >= t {
                            return err(
                                format!("{path}.ranges[{j}]"),
                                format!("from ({f}) must be below to ({t})"),
                            );
                        }
                    }
                    for (k, o) in g.ranges.iter().enumerate().take(j) {
                        let lo = |x: Option<i64>| x.unwrap_or(i64::MIN);
                        let hi = |x: Option<i64>| x.map_or(i128::MAX, |v| v as i128);
                        if (lo(r.from) as i128) < hi(o.to) && (lo(o.from) as i128) < hi(r.to) {
                            return err(
                                format!("{path}.ranges[{j}]"),
                                format!("overlaps ranges[{k}]"),
                            );
                        }
                    }
                }
            }
            ShardingFunction::List => {
                if g.lists.is_empty() {
                    return err(
                        format!("{path}.lists"),
                        "function = \"list\" needs at least one list".into(),
                    );
                }
                let mut seen = HashSet::new();
                for (j, l) in g.lists.iter().enumerate() {
                    if !shard_exists(&l.shard) {
                        return err(format!("{path}.lists[{j}].shard"), no_shard(&l.shard));
                    }
                    for v in &l.values {
                        if !key_fits(v) {
                            return err(
                                format!("{path}.lists[{j}].values"),
                                format!("expected {:?} keys, found {:?}", g.key_type, v),
                            );
                        }
                        if !seen.insert(v) {
                            return err(
                                format!("{path}.lists[{j}].values"),
                                format!("{v:?} is listed twice"),
                            );
                        }
                    }
                }
            }
            ShardingFunction::Consistent | ShardingFunction::PgHash => {}
        }
    }
    let mut tables = HashSet::new();
    for (i, t) in sh.tables.iter().enumerate() {
        if t.name.is_empty() || t.column.is_empty() {
            return err(
                format!("sharding.tables[{i}]"),
                "expected a table name and a key column".into(),
            );
        }
        if !tables.insert(t.name.to_ascii_lowercase()) {
            return err(
                format!("sharding.tables[{i}].name"),
                format!("table \"{}\" is listed twice", t.name),
            );
        }
        if let Some(g) = &t.group {
            if !group_names.contains(g.as_str()) {
                return err(
                    format!("sharding.tables[{i}].group"),
                    format!("no [[sharding.groups]] entry is named \"{g}\""),
                );
            }
        }
    }
    for (i, t) in c.reference_tables.iter().enumerate() {
        if t.name.is_empty() || !tables.insert(t.name.to_ascii_lowercase()) {
            return err(
                format!("reference_tables[{i}].name"),
                format!(
                    "expected a table name not already listed (as sharded or reference), found \"{}\"",
                    t.name
                ),
            );
        }
    }
    Ok(())
}

fn is_uuid(s: &str) -> bool {
    let hex: String = s
        .chars()
        .filter(|c| *c != '-' && *c != '{' && *c != '}')
        .collect();
    hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit())
}

fn auth_name(a: AuthMethod) -> &'static str {
    match a {
        AuthMethod::ScramSha256 => "scram-sha-256",
        AuthMethod::Md5 => "md5",
        AuthMethod::Trust => "trust",
    }
}

/// `SCRAM-SHA-256$<iter>:<salt>$<stored>:<server>`: shape only; the proxy decodes it.
fn parse_scram_shape(v: &str) -> Option<()> {
    let rest = v.strip_prefix("SCRAM-SHA-256$")?;
    let (iter_salt, keys) = rest.split_once('$')?;
    let (iter, salt) = iter_salt.split_once(':')?;
    iter.parse::<u32>().ok()?;
    let (stored, server) = keys.split_once(':')?;
    (!salt.is_empty() && !stored.is_empty() && !server.is_empty()).then_some(())
}
