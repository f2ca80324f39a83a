//! Client authentication (SCRAM-SHA-256, md5, trust), server authentication
//! (SCRAM-SHA-256, md5, cleartext, trust), TLS both ways, and login errors.

use shardline_tests::{psql, self_signed_cert, sqlstate, Env, EnvOptions};
use std::io::Write;
use std::sync::{Arc, Mutex};

async fn current_user(
    env: &Env,
    user: &str,
    password: &str,
) -> Result<String, tokio_postgres::Error> {
    let c = env.connect_as(user, password).await?;
    Ok(c.query_one("SELECT current_user::text", &[]).await?.get(0))
}

#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_methods_and_errors() {
    // Capture every log line, at the most verbose level, to check no secret leaks.
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .try_init();

    let env = Env::start().await.unwrap();
    // SCRAM-SHA-256 to the proxy, SCRAM-SHA-256 to the server.
    assert_eq!(current_user(&env, "app", "app").await.unwrap(), "app");
    // md5 to the proxy.
    assert_eq!(
        current_user(&env, "md5client", "md5client-pw")
            .await
            .unwrap(),
        "app"
    );
    // trust to the proxy.
    assert_eq!(
        current_user(&env, "trustclient", "anything").await.unwrap(),
        "app"
    );

    // Wrong passwords: 28P01, for each method that checks one.
    for (user, pw) in [("app", "wrong-secret-1"), ("md5client", "wrong-secret-2")] {
        let e = current_user(&env, user, pw).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{user}: {e}");
        assert!(e
            .as_db_error()
            .unwrap()
            .message()
            .contains("password authentication failed"));
    }
    // Unknown role: answered as Postgres answers, after a (mock) SCRAM
    // exchange and as a wrong password, so a stranger cannot tell which
    // roles exist. Unknown database: 3D000 only after a right password.
    let e = current_user(&env, "nobody", "x").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");
    assert_eq!(
        e.as_db_error().unwrap().message(),
        "password authentication failed for user \"nobody\""
    );
    let e = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=app password=wrong dbname=nodb",
            env.port
        ),
        tokio_postgres::NoTls,
    )
    .await
    .map(|_| ())
    .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");
    let (c, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=app password=app dbname=nodb",
            env.port
        ),
        tokio_postgres::NoTls,
    )
    .await
    .map(|(c, conn)| (Some(c), Some(conn)))
    .unwrap_or_else(|e| {
        assert_eq!(sqlstate(&e).as_deref(), Some("3D000"), "{e}");
        (None, None)
    });
    assert!(
        c.is_none() && conn.is_none(),
        "unknown database must be refused"
    );
    // The proxy still serves after all that.
    assert_eq!(current_user(&env, "app", "app").await.unwrap(), "app");

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("authentication failed"),
        "failures are logged"
    );
    for secret in [
        "wrong-secret-1",
        "wrong-secret-2",
        "md5client-pw",
        "password=app",
        "SCRAM-SHA-256$",
    ] {
        assert!(
            !text.contains(secret),
            "log output contains a secret ({secret})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_auth_methods() {
    let env = Env::start().await.unwrap();
    // The servers authenticate these roles with md5, cleartext and trust.
    assert_eq!(
        current_user(&env, "sl_md5", "md5pw").await.unwrap(),
        "sl_md5"
    );
    assert_eq!(
        current_user(&env, "sl_password", "plainpw").await.unwrap(),
        "sl_password"
    );
    assert_eq!(
        current_user(&env, "sl_trust", "unused").await.unwrap(),
        "sl_trust"
    );
    // And the method really is what we think: pg_hba decides per role.
    let methods = env.sql("SELECT string_agg(user_name[1] || '=' || auth_method, ',' ORDER BY line_number) FROM pg_hba_file_rules WHERE user_name[1] LIKE 'sl_%'");
    assert_eq!(methods, "sl_trust=trust,sl_md5=md5,sl_password=password");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_clients() {
    let (_certs, cert, key) = self_signed_cert().unwrap();
    let env = Env::start_with(EnvOptions {
        extra_toml: format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let url = format!("{}?sslmode=require", env.url("app", "app"));
    let (ok, out) = psql(
        &url,
        &["-A", "-t", "-c", "SELECT 'over tls'", "-c", "\\conninfo"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("over tls"), "{out}");
    assert!(
        out.contains("SSL connection (protocol: TLSv1.3"),
        "psql reports TLS: {out}"
    );
    // A plain-text client is served here (tls.mode = "allow", the default).
    let (ok, out) = psql(
        &format!("{}?sslmode=disable", env.url("app", "app")),
        &["-A", "-t", "-c", "SELECT 'plain'"],
    );
    assert!(ok && out.contains("plain"), "{out}");
    // Without TLS configured, a client that requires it is refused.
    let plain = Env::start().await.unwrap();
    let (ok, out) = psql(
        &format!("{}?sslmode=require", plain.url("app", "app")),
        &["-c", "SELECT 1"],
    );
    assert!(!ok && out.contains("does not support SSL"), "{out}");
}

/// `tls.mode = "require"`: plain-text clients are refused before they
/// authenticate, with 28000 saying why; TLS clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_can_be_required_of_clients() {
    let (_certs, cert, key) = self_signed_cert().unwrap();
    let env = Env::start_with(EnvOptions {
        extra_toml: format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nmode = \"require\"\n",
            cert.display(),
            key.display()
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let (ok, out) = psql(
        &format!("{}?sslmode=require", env.url("app", "app")),
        &["-A", "-t", "-c", "SELECT 'over tls'"],
    );
    assert!(ok && out.contains("over tls"), "{out}");
    let (ok, out) = psql(
        &format!("{}?sslmode=disable", env.url("app", "app")),
        &["-A", "-t", "-c", "SELECT 'plain'"],
    );
    assert!(!ok && out.contains("accepts only TLS connections"), "{out}");
    let e = env.connect_as("app", "app").await.map(|_| ()).unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_servers() {
    let env = Env::start_with(EnvOptions {
        pool_toml: "server_tls = \"require\"\n".into(),
        replicas_per_shard: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let c = env.connect_as("app", "app").await;
    // TLS was not on yet: the server refuses TLS and `require` refuses the server.
    let e = match c {
        Ok(c) => c.query_one("SELECT 1", &[]).await.unwrap_err(),
        Err(e) => e,
    };
    assert!(
        e.to_string().contains("TLS") || format!("{e:?}").contains("TLS"),
        "{e:?}"
    );
    env.backend.enable_tls(0).unwrap();
    // The proxy's next health check sees the server answer again.
    env.wait_healthy().await;
    let c = env.connect_as("app", "app").await.unwrap();
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the server connection is encrypted");
}
