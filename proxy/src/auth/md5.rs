//! md5 password authentication: the client sends
//! `"md5" || md5(hex(md5(password || user)) || salt)`.

use md5::{Digest, Md5};

fn hex_md5(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `md5(password || user)` in lowercase hex.
pub fn user_hash(user: &str, password: &str) -> String {
    hex_md5(&[password.as_bytes(), user.as_bytes()])
}

/// The response a client with the right password sends for `salt`.
pub fn expected_response(user_hash_hex: &str, salt: [u8; 4]) -> String {
    format!("md5{}", hex_md5(&[user_hash_hex.as_bytes(), &salt]))
}

/// Checks a client's PasswordMessage payload (without its NUL).
pub fn verify(user_hash_hex: &str, salt: [u8; 4], response: &[u8]) -> bool {
    super::constant_time_eq(expected_response(user_hash_hex, salt).as_bytes(), response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_libpq_hashing() {
        let salt = [1, 2, 3, 4];
        let ours = expected_response(&user_hash("app", "secret"), salt);
        let theirs = postgres_protocol::authentication::md5_hash(b"app", b"secret", salt);
        assert_eq!(ours, theirs);
        assert!(verify(&user_hash("app", "secret"), salt, theirs.as_bytes()));
        assert!(!verify(&user_hash("app", "wrong"), salt, theirs.as_bytes()));
    }
}
