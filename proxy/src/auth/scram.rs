//! SCRAM-SHA-256 (RFC 5802/7677) with the proxy as the server, checking clients
//! against a stored verifier, the same format Postgres keeps in pg_authid.
//! Channel binding (-PLUS) is not offered, so clients use `n,,` or `y,,`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

pub const MECHANISM: &str = "SCRAM-SHA-256";

type HmacSha256 = hmac::Hmac<Sha256>;

/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, decoded.
#[derive(Clone)]
pub struct Verifier {
    iterations: u32,
    salt_b64: String,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl Verifier {
    pub fn parse(v: &str) -> Option<Verifier> {
        let rest = v.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        B64.decode(salt).ok()?;
        let stored_key = B64.decode(stored).ok()?;
        let server_key = B64.decode(server).ok()?;
        if stored_key.len() != 32 || server_key.len() != 32 {
            return None;
        }
        Some(Verifier {
            iterations: iter.parse().ok().filter(|&i| i > 0)?,
            salt_b64: salt.to_string(),
            stored_key,
            server_key,
        })
    }

    /// A verifier no password matches, for a role that does not exist: the
    /// exchange runs as for a real one, then fails as a wrong password
    /// does, so a stranger cannot tell which roles exist. The salt depends
    /// only on the name and a secret of this process, so a role's salt does
    /// not change between attempts (as a real one's would not).
    pub fn mock(user: &str) -> Verifier {
        static SECRET: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        let secret = SECRET.get_or_init(|| {
            let mut s = [0u8; 32];
            rand::fill(&mut s);
            s
        });
        let salt = &hmac(secret, user.as_bytes())[..16];
        let mut stored_key = vec![0u8; 32];
        rand::fill(&mut stored_key[..]);
        Verifier {
            iterations: 4096,
            salt_b64: B64.encode(salt),
            server_key: stored_key.clone(),
            stored_key,
        }
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("unsupported SASL mechanism {0}")]
    Mechanism(String),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("password authentication failed")]
    BadProof,
}

/// Server side of one exchange, after the client's first message.
pub struct ServerExchange {
    verifier: Verifier,
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
    nonce: String,
}

impl ServerExchange {
    /// Reads the SASLInitialResponse payload (mechanism, length, client-first) and
    /// returns the exchange and the server-first message to send.
    pub fn start(
        verifier: &Verifier,
        mechanism: &str,
        client_first: &[u8],
    ) -> Result<(ServerExchange, String), ScramError> {
        if mechanism != MECHANISM {
            return Err(ScramError::Mechanism(mechanism.to_string()));
        }
        let text =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (gs2_header, bare) = split_gs2(text)?;
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic() && b != b','))
            .ok_or(ScramError::Malformed("client nonce"))?;
        let mut raw = [0u8; 18];
        rand::fill(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            verifier.salt_b64, verifier.iterations
        );
        Ok((
            ServerExchange {
                verifier: verifier.clone(),
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                gs2_header: gs2_header.to_string(),
                nonce,
            },
            server_first,
        ))
    }

    /// Checks the client-final message; on success returns server-final (`v=...`).
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        let channel = B64
            .decode(channel.ok_or(ScramError::Malformed("channel binding"))?)
            .map_err(|_| ScramError::Malformed("channel binding"))?;
        if channel != self.gs2_header.as_bytes() {
            return Err(ScramError::ChannelBinding);
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce mismatch"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof"))?;
        if proof.len() != 32 {
            return Err(ScramError::BadProof);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        let stored = Sha256::digest(&client_key);
        if !super::constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

fn split_gs2(text: &str) -> Result<(&str, &str), ScramError> {
    let mut parts = text.splitn(3, ',');
    let flag = parts.next().ok_or(ScramError::Malformed("gs2 header"))?;
    let authzid = parts.next().ok_or(ScramError::Malformed("gs2 header"))?;
    let bare = parts.next().ok_or(ScramError::Malformed("gs2 header"))?;
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed("gs2 flag")),
    }
    if !authzid.is_empty() && !authzid.starts_with("a=") {
        return Err(ScramError::Malformed("authzid"));
    }
    let header_len = flag.len() + authzid.len() + 2;
    Ok((&text[..header_len], bare))
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(password: &[u8], verifier_for: &[u8]) -> Result<(), ScramError> {
        let verifier =
            Verifier::parse(&postgres_protocol::password::scram_sha_256(verifier_for)).unwrap();
        let mut client = ScramSha256::new(password, ChannelBinding::unsupported());
        let (server, server_first) = ServerExchange::start(&verifier, MECHANISM, client.message())?;
        client.update(server_first.as_bytes()).unwrap();
        let server_final = server.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .expect("client accepts the server's signature");
        Ok(())
    }

    #[test]
    fn libpq_style_client_authenticates() {
        exchange(b"secret", b"secret").unwrap();
    }

    #[test]
    fn wrong_password_is_refused() {
        assert_eq!(exchange(b"wrong", b"secret"), Err(ScramError::BadProof));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let verifier = Verifier::parse(&postgres_protocol::password::scram_sha_256(b"x")).unwrap();
        for bad in [
            &b""[..],
            b"n",
            b"n,,",
            b"x,,r=a",
            b"p=tls-server-end-point,,n=,r=abc",
            b"\xff\xfe",
        ] {
            assert!(
                ServerExchange::start(&verifier, MECHANISM, bad).is_err(),
                "{bad:?}"
            );
        }
        assert!(ServerExchange::start(&verifier, "PLAIN", b"n,,n=,r=abc").is_err());
        let (ex, _) = ServerExchange::start(&verifier, MECHANISM, b"n,,n=,r=abc").unwrap();
        assert!(ex.finish(b"c=biws,r=abc,p=AAAA").is_err());
        assert!(Verifier::parse("SCRAM-SHA-256$0:c2FsdA==$AA==:AA==").is_none());
    }
}
