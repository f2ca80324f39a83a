//! The first messages of a connection, byte by byte: SSL/GSSENC negotiation,
//! protocol version negotiation, the login burst, and ParameterStatus later on.

use shardline::protocol::startup::{code_packet, startup_message, GSSENC_REQUEST, SSL_REQUEST};
use shardline_tests::{message, Env, RawClient};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The value the client knows after `msgs` (the last report: the proxy
/// forwards the servers' reports when it replays the client's settings).
fn parameter(msgs: &[(u8, Vec<u8>)], name: &str) -> Option<String> {
    shardline_tests::parameter_status(msgs, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_and_ssl_requests_are_declined_without_tls() {
    let env = Env::start().await.unwrap();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
        .await
        .unwrap();
    for code in [GSSENC_REQUEST, SSL_REQUEST] {
        s.write_all(&code_packet(code, &[])).await.unwrap();
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer[0], b'N');
    }
    // The connection carries on to a normal login after both refusals.
    s.write_all(&startup_message(&[
        ("user", "trustclient"),
        ("database", "app"),
    ]))
    .await
    .unwrap();
    let mut c = RawClient::from_stream(s);
    let msgs = c.until_ready().await.unwrap();
    assert!(msgs.iter().any(|(t, _)| *t == b'R'), "{msgs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_burst_reports_server_parameters_and_client_overrides() {
    let env = Env::start().await.unwrap();
    let s = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
        .await
        .unwrap();
    let mut c = RawClient::from_stream(s);
    c.send(&startup_message(&[
        ("user", "trustclient"),
        ("database", "app"),
        ("application_name", "burst-test"),
    ]))
    .await
    .unwrap();
    let msgs = c.until_ready().await.unwrap();
    let tags: Vec<u8> = msgs.iter().map(|m| m.0).collect();
    assert_eq!(tags.first(), Some(&b'R'), "AuthenticationOk first");
    assert!(tags.contains(&b'K'), "BackendKeyData");
    assert_eq!(tags.last(), Some(&b'Z'));
    assert!(parameter(&msgs, "server_version").is_some_and(|v| !v.is_empty()));
    assert_eq!(parameter(&msgs, "server_encoding").as_deref(), Some("UTF8"));
    assert_eq!(parameter(&msgs, "integer_datetimes").as_deref(), Some("on"));
    assert_eq!(
        parameter(&msgs, "application_name").as_deref(),
        Some("burst-test")
    );
    // A later SET that the server reports reaches the client as ParameterStatus.
    c.send(&message(b'Q', b"SET application_name = 'changed'\0"))
        .await
        .unwrap();
    let msgs = c.until_ready().await.unwrap();
    assert_eq!(
        parameter(&msgs, "application_name").as_deref(),
        Some("changed"),
        "{msgs:?}"
    );
    // And the setting is the client's on whatever connection it gets next.
    c.send(&message(b'Q', b"SHOW application_name\0"))
        .await
        .unwrap();
    let msgs = c.until_ready().await.unwrap();
    let row = msgs.iter().find(|(t, _)| *t == b'D').expect("a row");
    assert!(row.1.ends_with(b"changed"), "{msgs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_protocol_minor_version_is_negotiated_down() {
    let env = Env::start().await.unwrap();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
        .await
        .unwrap();
    // Protocol 3.2 with an extension option we do not know.
    let mut body = (3i32 << 16 | 2).to_be_bytes().to_vec();
    for (k, v) in [
        ("user", "trustclient"),
        ("database", "app"),
        ("_pq_.something", "1"),
    ] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    s.write_all(&packet).await.unwrap();
    let mut c = RawClient::from_stream(s);
    let first = c.recv(Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!(first.0, b'v', "NegotiateProtocolVersion");
    assert_eq!(
        &first.1[..8],
        &[0, 0, 0, 0, 0, 0, 0, 1],
        "newest minor 0, one unrecognised option"
    );
    assert!(first.1.ends_with(b"_pq_.something\0"));
    let msgs = c.until_ready().await.unwrap();
    assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_without_user_and_wrong_protocol() {
    let env = Env::start().await.unwrap();
    let s = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
        .await
        .unwrap();
    let mut c = RawClient::from_stream(s);
    c.send(&startup_message(&[("database", "app")]))
        .await
        .unwrap();
    let msgs = c.until_closed().await.unwrap();
    assert_eq!(shardline_tests::error_code(&msgs[0].1), "28000");
    // A role that does not exist is asked for a password like any other
    // (SCRAM), not told at once that it does not exist.
    let s = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
        .await
        .unwrap();
    let mut c = RawClient::from_stream(s);
    c.send(&startup_message(&[("user", "nobody"), ("database", "app")]))
        .await
        .unwrap();
    let first = c.recv(Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!(first.0, b'R', "an authentication request");
    assert_eq!(&first.1[..4], &10i32.to_be_bytes(), "SASL");
    assert!(first.1[4..].starts_with(b"SCRAM-SHA-256\0"));
    // Protocol 2.0 is refused with 08P01.
    let s = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
        .await
        .unwrap();
    let mut c = RawClient::from_stream(s);
    c.send(&[0, 0, 0, 8, 0, 2, 0, 0]).await.unwrap();
    let msgs = c.until_closed().await.unwrap();
    assert_eq!(shardline_tests::error_code(&msgs[0].1), "08P01");
}
