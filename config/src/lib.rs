//! Shardline's configuration: one TOML file turned into a validated, immutable
//! [`Config`].
//!
//! Parsing happens in two steps. Serde turns the text into the raw schema (every
//! struct denies unknown keys, so a typo is an error, not a silently ignored
//! setting), tracking the key path with `serde_path_to_error` so a type error can
//! name `shards[1].primary.port` rather than just a line. Then [`validate`] checks
//! what types cannot: duplicate names, passwords that do not fit the auth method,
//! pairs of settings that only make sense together. Either step reports exactly
//! one [`ConfigError`] naming the file, the key path and what was expected; the
//! proxy never starts half-configured.

mod duration;
mod schema;
mod validate;

use std::path::Path;

pub use duration::parse_duration;
pub use schema::*;

/// A configuration problem, reported once, with enough context to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {}{message}{}", if path == "." { String::new() } else { format!("{path}: ") }, location.as_ref().map(|l| format!(" (line {}, column {})", l.0, l.1)).unwrap_or_default())]
pub struct ConfigError {
    /// The file the configuration came from (or `<string>`).
    pub file: String,
    /// The key path, e.g. `shards[0].primary.port`; `.` for the document root.
    pub path: String,
    /// What is wrong and what was expected.
    pub message: String,
    /// Line and column (1-based) when the TOML parser knows them.
    pub location: Option<(usize, usize)>,
}

impl ConfigError {
    fn new(file: &str, path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_string(),
            path: path.into(),
            message: message.into(),
            location: None,
        }
    }
}

impl Config {
    /// A fingerprint of where rows live: the shards' names in order, the
    /// sharding section and the reference tables. Two configs with the
    /// same fingerprint place every row alike (the proxy shows it as
    /// `sharding.placement` in SHOW CONFIG; `shardline-rebalance --admin`
    /// checks each proxy reports the new one after its RELOAD).
    pub fn placement_fingerprint(&self) -> String {
        let names: Vec<&str> = self.shards.iter().map(|s| s.name.as_str()).collect();
        let text = format!("{names:?}{:?}{:?}", self.sharding, self.reference_tables);
        // FNV-1a, 64 bits: the same in every build, unlike std's hasher.
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        format!("{hash:016x}")
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(&name, ".", format!("cannot read file: {e}")))?;
        Config::from_toml(&text, &name)
    }

    /// Parses and validates configuration text; `file` names it in errors.
    pub fn from_toml(text: &str, file: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let location = inner.span().map(|span| line_col(text, span.start));
            ConfigError {
                file: file.to_string(),
                path: if path.is_empty() { ".".into() } else { path },
                message: inner.message().trim().to_string(),
                location,
            }
        })?;
        validate::validate(&config, file)?;
        Ok(config)
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

#[cfg(test)]
mod tests;
