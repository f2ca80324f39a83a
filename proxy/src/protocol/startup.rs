//! The untagged packets a connection opens with: SSLRequest, GSSENCRequest,
//! CancelRequest and StartupMessage.

use super::{FrameError, Reader};

pub const SSL_REQUEST: i32 = 80877103;
pub const GSSENC_REQUEST: i32 = 80877104;
pub const CANCEL_REQUEST: i32 = 80877102;
pub const PROTOCOL_3: i32 = 196608;

/// Startup packets are small; anything bigger is an attack or garbage.
pub const MAX_STARTUP_PACKET: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: i32,
    },
    Startup {
        /// Minor protocol version the client asked for (0 for 3.0).
        minor: u16,
        params: Vec<(String, String)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("invalid startup packet layout")]
    Malformed,
}

/// Returns the total length of the startup packet at the start of `buf`, when
/// its length word has arrived.
pub fn packet_len(buf: &[u8]) -> Result<Option<usize>, StartupError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(FrameError::BadLength(len).into());
    }
    if len as usize > MAX_STARTUP_PACKET {
        return Err(FrameError::TooLarge {
            len: len as usize,
            max: MAX_STARTUP_PACKET,
        }
        .into());
    }
    Ok(Some(len as usize))
}

/// Decodes one complete startup packet (length word included).
pub fn parse(packet: &[u8]) -> Result<StartupPacket, StartupError> {
    let mut r = Reader::new(packet.get(4..).ok_or(StartupError::Malformed)?);
    let code = r.i32().ok_or(StartupError::Malformed)?;
    match code {
        SSL_REQUEST => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST => {
            let pid = r.i32().ok_or(StartupError::Malformed)?;
            let secret = r.i32().ok_or(StartupError::Malformed)?;
            Ok(StartupPacket::Cancel { pid, secret })
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            let mut params = Vec::new();
            loop {
                let key = r.str().ok_or(StartupError::Malformed)?;
                if key.is_empty() {
                    break;
                }
                let value = r.str().ok_or(StartupError::Malformed)?;
                params.push((key.to_string(), value.to_string()));
            }
            Ok(StartupPacket::Startup { minor, params })
        }
    }
}

/// Builds a StartupMessage for protocol 3.0.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(&PROTOCOL_3.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// An SSLRequest or CancelRequest packet.
pub fn code_packet(code: i32, extra: &[i32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&((8 + 4 * extra.len()) as i32).to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    for v in extra {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_startup() {
        let p = startup_message(&[("user", "app"), ("database", "db")]);
        assert_eq!(packet_len(&p).unwrap(), Some(p.len()));
        assert_eq!(
            parse(&p).unwrap(),
            StartupPacket::Startup {
                minor: 0,
                params: vec![
                    ("user".into(), "app".into()),
                    ("database".into(), "db".into())
                ]
            }
        );
    }

    #[test]
    fn requests() {
        assert_eq!(
            parse(&code_packet(SSL_REQUEST, &[])).unwrap(),
            StartupPacket::SslRequest
        );
        assert_eq!(
            parse(&code_packet(GSSENC_REQUEST, &[])).unwrap(),
            StartupPacket::GssEncRequest
        );
        assert_eq!(
            parse(&code_packet(CANCEL_REQUEST, &[7, -9])).unwrap(),
            StartupPacket::Cancel { pid: 7, secret: -9 }
        );
    }

    #[test]
    fn garbage() {
        assert!(packet_len(b"\0\0\0\x01").is_err());
        assert!(packet_len(b"\x7f\0\0\0").is_err());
        assert!(parse(b"\0\0\0\x08\0\x02\0\0").is_err());
        // Unterminated parameter list.
        assert_eq!(
            parse(b"\0\0\0\x0c\0\x03\0\0user"),
            Err(StartupError::Malformed)
        );
        assert_eq!(parse(b"\0\0"), Err(StartupError::Malformed));
    }
}
