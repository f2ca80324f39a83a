//! Authenticating clients (the proxy plays the server) and the secrets it keeps
//! for that. The exchanges are IO-free state machines; `session::startup` drives
//! them over the socket.

pub mod md5;
pub mod scram;

use shardline_config::{password_kind, AuthMethod, PasswordKind, User};

/// What the proxy checks a user's password against, derived once at load.
#[derive(Clone)]
pub enum Secret {
    Trust,
    Md5 {
        /// `md5(password || user)` in hex, without the `md5` prefix.
        hash: String,
    },
    Scram(scram::Verifier),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets, even in debug output.
        f.write_str(match self {
            Secret::Trust => "Secret::Trust",
            Secret::Md5 { .. } => "Secret::Md5(..)",
            Secret::Scram(_) => "Secret::Scram(..)",
        })
    }
}

impl Secret {
    /// Derives the secret for a validated user entry.
    pub fn for_user(user: &User) -> Result<Secret, String> {
        let password = user.password.as_deref();
        match (user.auth, password) {
            (AuthMethod::Trust, _) => Ok(Secret::Trust),
            (AuthMethod::Md5, Some(p)) => Ok(Secret::Md5 {
                hash: match password_kind(p) {
                    PasswordKind::Md5 => p[3..].to_ascii_lowercase(),
                    _ => md5::user_hash(&user.name, p),
                },
            }),
            (AuthMethod::ScramSha256, Some(p)) => {
                let verifier = match password_kind(p) {
                    PasswordKind::Scram => p.to_string(),
                    _ => postgres_protocol::password::scram_sha_256(p.as_bytes()),
                };
                scram::Verifier::parse(&verifier)
                    .map(Secret::Scram)
                    .ok_or_else(|| format!("user {}: malformed SCRAM-SHA-256 verifier", user.name))
            }
            (_, None) => Err(format!("user {} has no password", user.name)),
        }
    }
}

/// Compares secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
