//! Checks that the types alone cannot express.

use crate::{password_kind, AuthMethod, Config, ConfigError, PasswordKind};
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
    Ok(())
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
