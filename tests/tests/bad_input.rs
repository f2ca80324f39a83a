//! Bad input never takes the proxy down: malformed and oversized messages get
//! 08P01 and close only that client; a server dying mid-query gives an error
//! for that query only.

use shardline_tests::{error_code, message, sqlstate, tags, Env, EnvOptions, RawClient};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Asserts the proxy answered with a FATAL 08P01 and closed the connection.
async fn expect_protocol_violation(mut c: RawClient) {
    let msgs = c.until_closed().await.unwrap();
    let err = msgs
        .iter()
        .find(|(t, _)| *t == b'E')
        .expect("an ErrorResponse");
    assert_eq!(error_code(&err.1), "08P01", "{msgs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_close_only_that_client() {
    let env = Env::start_with(EnvOptions {
        proxy_toml: "max_message_size = 1048576\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let good = env.connect().await;
    let good_task = tokio::spawn(async move {
        for i in 0..200 {
            let v: i32 = good
                .query_one("SELECT $1::int", &[&i])
                .await
                .unwrap()
                .get(0);
            assert_eq!(v, i);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });

    // Length shorter than the length field itself.
    let mut c = RawClient::login(env.port).await.unwrap();
    c.send(b"Q\0\0\0\x02").await.unwrap();
    expect_protocol_violation(c).await;

    // Negative length.
    let mut c = RawClient::login(env.port).await.unwrap();
    c.send(b"Q\xff\xff\xff\xf0").await.unwrap();
    expect_protocol_violation(c).await;

    // Longer than max_message_size (1 MiB): refused from the header alone.
    let mut c = RawClient::login(env.port).await.unwrap();
    c.send(b"Q\0\xa0\0\0SELECT").await.unwrap();
    expect_protocol_violation(c).await;

    // Unknown message type.
    let mut c = RawClient::login(env.port).await.unwrap();
    c.send(&message(b'z', b"hello")).await.unwrap();
    expect_protocol_violation(c).await;

    // A Query without its terminating NUL, and a Parse with a bad type count.
    let mut c = RawClient::login(env.port).await.unwrap();
    c.send(&message(b'Q', b"SELECT 1")).await.unwrap();
    expect_protocol_violation(c).await;
    let mut c = RawClient::login(env.port).await.unwrap();
    c.send(&message(b'P', b"s\0SELECT 1\0\0\x05"))
        .await
        .unwrap();
    expect_protocol_violation(c).await;

    // Garbage instead of a startup packet.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut c = RawClient::from_stream(s);
    // The proxy answers with an error and closes; unread input may turn the
    // close into a reset, so the error itself may or may not arrive.
    if let Ok(msgs) = c.until_closed().await {
        assert!(msgs.iter().all(|(t, _)| *t == b'E'), "{msgs:?}");
    }

    // Truncated frames: the client vanishes halfway through a message.
    for _ in 0..10 {
        let mut c = RawClient::login(env.port).await.unwrap();
        c.send(b"Q\0\0\0\x40SELEC").await.unwrap();
        drop(c);
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
            .await
            .unwrap();
        s.write_all(b"\0\0\0\x50\0\x03\0\0user\0").await.unwrap();
        drop(s);
    }

    // Random bytes after login, many clients at once.
    let mut tasks = Vec::new();
    for seed in 0..20u8 {
        let port = env.port;
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::login(port).await.unwrap();
            let junk: Vec<u8> = (0..300u32)
                .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
                .collect();
            let _ = c.send(&junk).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), c.until_closed()).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    good_task.await.unwrap();
    // Still serving.
    let c = env.connect().await;
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_and_named_statements_over_raw_protocol() {
    let env = Env::start().await.unwrap();
    let mut c = RawClient::login(env.port).await.unwrap();
    let sync = || message(b'S', b"");
    let bind_execute = |stmt: &[u8]| {
        let mut bind = vec![0u8];
        bind.extend_from_slice(stmt);
        bind.extend_from_slice(b"\0\0\0\0\0\0\0");
        vec![
            message(b'B', &bind),
            message(b'E', b"\0\0\0\0\0"),
            message(b'S', b""),
        ]
    };
    // Parse a named statement, then DEALLOCATE it by name over the simple protocol.
    let msgs = c
        .exchange(&[message(b'P', b"mystmt\0SELECT 42\0\0\0"), sync()])
        .await
        .unwrap();
    assert_eq!(tags(&msgs), b"1Z");
    let msgs = c
        .exchange(&[message(b'Q', b"DEALLOCATE mystmt\0")])
        .await
        .unwrap();
    assert_eq!(tags(&msgs), b"CZ", "{msgs:?}");
    // Binding it now fails as on a server, and the pipeline after the error is skipped.
    let msgs = c.exchange(&bind_execute(b"mystmt")).await.unwrap();
    assert_eq!(tags(&msgs), b"EZ", "{msgs:?}");
    assert_eq!(error_code(&msgs[0].1), "26000");
    // Parse the same name twice: 42P05, as a server says.
    let parse_twice = [
        message(b'P', b"dup\0SELECT 1\0\0\0"),
        message(b'P', b"dup\0SELECT 2\0\0\0"),
        sync(),
    ];
    let msgs = c.exchange(&parse_twice).await.unwrap();
    assert_eq!(tags(&msgs), b"1EZ", "{msgs:?}");
    assert_eq!(error_code(&msgs[1].1), "42P05");
    // Describe with Flush (no Sync): the answer arrives without waiting for a Sync.
    c.send(&[message(b'D', b"Sdup\0"), message(b'H', b"")].concat())
        .await
        .unwrap();
    let (t1, _) = c.recv(Duration::from_secs(5)).await.unwrap().unwrap();
    let (t2, _) = c.recv(Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!(
        (t1, t2),
        (b't', b'T'),
        "Flush delivers the Describe answer without Sync"
    );
    let msgs = c.exchange(&bind_execute(b"dup")).await.unwrap();
    assert_eq!(tags(&msgs), b"2DCZ", "{msgs:?}");
    // Closing a statement the server never saw is answered by the proxy.
    let msgs = c
        .exchange(&[message(b'C', b"Sdup\0"), sync()])
        .await
        .unwrap();
    assert_eq!(tags(&msgs), b"3Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_dying_mid_query() {
    // One node: a read on a replica would be re-run elsewhere (routing.rs).
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let c = env.connect().await;
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let q = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_sleep(20)").await;
        (c, r)
    });
    env.wait_sql(
        &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND query = 'SELECT pg_sleep(20)' AND state = 'active'"),
        "1",
    )
    .await;
    env.sql(&format!("SELECT pg_terminate_backend({pid})"));
    let (c, r) = tokio::time::timeout(Duration::from_secs(10), q)
        .await
        .unwrap()
        .unwrap();
    let e = r.unwrap_err();
    let code = sqlstate(&e).unwrap_or_default();
    assert!(code == "57P01" || code == "08006", "{e:?}");
    // The connection was discarded; the client goes on with a new one.
    let p2: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(p2, pid);
    assert_eq!(
        env.sql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
        )),
        "0"
    );

    // Inside a transaction the client's session cannot continue: FATAL and closed.
    let mut c = env.connect().await;
    let tx = c.transaction().await.unwrap();
    let pid: i32 = tx
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    env.sql(&format!("SELECT pg_terminate_backend({pid})"));
    env.wait_sql(
        &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
        "0",
    )
    .await;
    assert!(tx.query_one("SELECT 1", &[]).await.is_err());
    drop(tx);
    assert!(c.is_closed() || c.query_one("SELECT 1", &[]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_rejected_mid_stream_over_extended_protocol() {
    let env = Env::start().await.unwrap();
    env.sql("CREATE TABLE c (id int); GRANT ALL ON c TO app;");
    // A pool of one connection: a session that keeps it pinned starves the next.
    let mut c = RawClient::login_as(env.port, "trustsingle").await.unwrap();
    // Parse/Bind/Execute/Sync for COPY FROM STDIN, as drivers send it.
    let copy = [
        message(b'P', b"\0COPY c FROM STDIN\0\0\0"),
        message(b'B', b"\0\0\0\0\0\0\0\0"),
        message(b'E', b"\0\0\0\0\0"),
        message(b'S', b""),
    ];
    c.send(&copy.concat()).await.unwrap();
    let (t1, _) = c.recv(Duration::from_secs(5)).await.unwrap().unwrap();
    let (t2, _) = c.recv(Duration::from_secs(5)).await.unwrap().unwrap();
    let (t3, _) = c.recv(Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!([t1, t2, t3], *b"12G");
    // A bad row: the server reports the error while the client is still sending.
    c.send(&message(b'd', b"not-a-number\n")).await.unwrap();
    let (t, body) = c.recv(Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!(t, b'E');
    assert_eq!(error_code(&body), "22P02");
    // The client finishes its side, then syncs: exactly one ReadyForQuery.
    let msgs = c
        .exchange(&[
            message(b'd', b"1\n"),
            message(b'c', b""),
            message(b'S', b""),
        ])
        .await
        .unwrap();
    assert_eq!(tags(&msgs), b"Z", "{msgs:?}");
    // The session is in step: a query answers normally, twice.
    for _ in 0..2 {
        let msgs = c
            .exchange(&[message(b'Q', b"SELECT count(*) FROM c\0")])
            .await
            .unwrap();
        assert_eq!(tags(&msgs), b"TDCZ", "{msgs:?}");
    }
    // And it gave the connection back: another client of the same pool gets it.
    let mut other = RawClient::login_as(env.port, "trustsingle").await.unwrap();
    let msgs = other
        .exchange(&[message(b'Q', b"SELECT 1\0")])
        .await
        .unwrap();
    assert_eq!(tags(&msgs), b"TDCZ", "{msgs:?}");
}

/// COPY FROM STDIN's data, forwarded in runs (`client.rs`), is still held
/// to `max_message_size`: a CopyData past it behind 1,000 good ones ends
/// the client (08P01, or a reset when the proxy closes with the client's
/// bytes unread), and the COPY, cut short, leaves no row behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_data_past_the_message_limit_ends_the_copy() {
    let env = Env::start_with(EnvOptions {
        proxy_toml: "max_message_size = 1048576\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    env.sql("CREATE TABLE cut (n int); GRANT ALL ON cut TO app;");
    let mut c = RawClient::login(env.port).await.unwrap();
    c.start_copy_in("COPY cut FROM STDIN").await.unwrap();
    let mut data: Vec<u8> = (0..1000)
        .flat_map(|i| message(b'd', format!("{i}\n").as_bytes()))
        .collect();
    // A whole CopyData of 2 MiB, in the same write as the rows.
    data.extend(message(b'd', &vec![b'1'; 2 << 20]));
    // The proxy closes the connection with the client's bytes unread: the
    // client may see a reset before (or instead of) the FATAL.
    let _ = c.send(&data).await;
    loop {
        match c.recv(Duration::from_secs(10)).await {
            Ok(Some((b'E', body))) => assert_eq!(error_code(&body), "08P01"),
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) => break,
            Err(e) => {
                let reset = e.downcast_ref::<std::io::Error>().map(|e| e.kind())
                    == Some(std::io::ErrorKind::ConnectionReset);
                assert!(reset, "the connection was not closed: {e}");
                break;
            }
        }
    }
    shardline_tests::wait_for("the cut COPY's server session to end", || async {
        env.sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY cut%' AND pid <> pg_backend_pid()") == "0"
    })
    .await;
    assert_eq!(env.sql("SELECT count(*) FROM cut"), "0");
}
