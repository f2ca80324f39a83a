//! A client's first moments: TLS negotiation, the StartupMessage, CancelRequest,
//! authentication, and the ParameterStatus / BackendKeyData / ReadyForQuery a
//! client expects before its first query.

use crate::auth::{md5, scram, Secret};
use crate::protocol::backend::{self, sqlstate, PgError};
use crate::protocol::startup::{self, StartupPacket};
use crate::protocol::{frontend, next_frame, Reader};
use crate::stream::Stream;
use crate::{Shared, UserEntry};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client that has logged in.
pub struct LoggedIn {
    pub stream: Stream,
    pub user: Arc<UserEntry>,
    /// Startup parameters the client sent (user and database included).
    pub params: Vec<(String, String)>,
    pub peer: SocketAddr,
}

/// How the startup phase ended, when not with a logged-in client.
pub enum Outcome {
    LoggedIn(LoggedIn, crate::clients::Registration),
    /// An admin logged in to the console (`admin::console`).
    Console(Stream, crate::clients::Registration),
    /// A CancelRequest was handled, or the client left.
    Done,
}

/// Reads one untagged startup packet.
async fn read_startup_packet(stream: &mut Stream) -> Result<Vec<u8>, PgError> {
    let proto = |m: String| PgError::fatal(sqlstate::PROTOCOL_VIOLATION, m);
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .await
        .map_err(|e| proto(format!("incomplete startup packet: {e}")))?;
    let total = startup::packet_len(&len)
        .map_err(|e| proto(e.to_string()))?
        .unwrap_or(0);
    let mut packet = vec![0u8; total];
    packet[..4].copy_from_slice(&len);
    stream
        .read_exact(&mut packet[4..])
        .await
        .map_err(|e| proto(format!("incomplete startup packet: {e}")))?;
    Ok(packet)
}

/// Runs startup and authentication. Errors are reported to the client as FATAL.
/// `ending` is how the session will be ended from outside (shutdown,
/// KILL_CLIENT): the client's slot keeps it.
pub async fn accept(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    ending: Arc<crate::clients::Ending>,
) -> Outcome {
    let (stream, result) = handshake(shared, Stream::Plain(tcp)).await;
    let Some(mut stream_ok) = stream else {
        return Outcome::Done;
    };
    match result {
        Ok(Some((Login::Console(user), params, _))) => {
            match console_login(shared, stream_ok, user, params, peer, ending).await {
                Ok(outcome) => outcome,
                Err((mut stream, e)) => {
                    report(&mut stream, &e).await;
                    Outcome::Done
                }
            }
        }
        Ok(Some((Login::Known(user), params, minor))) => {
            match login(shared, stream_ok, user, params, minor, peer, ending).await {
                Ok(outcome) => outcome,
                Err((mut stream, e)) => {
                    report(&mut stream, &e).await;
                    Outcome::Done
                }
            }
        }
        Ok(Some((unknown, _, _))) => {
            // As Postgres answers: authentication first (a mock exchange for
            // a role that does not exist, so its absence looks like a wrong
            // password), then, for a known role, the missing database.
            let mut out = BytesMut::new();
            let e = match &unknown {
                Login::UnknownRole(name) => {
                    let mock = Secret::Scram(scram::Verifier::mock(name));
                    authenticate(&mut stream_ok, &mock, name, &mut out)
                        .await
                        .err()
                        .unwrap_or_else(|| auth_failed(name))
                }
                Login::UnknownDatabase(user, database) => {
                    match authenticate(&mut stream_ok, &user.secret, &user.name, &mut out).await {
                        Ok(()) => PgError::fatal(
                            sqlstate::INVALID_CATALOG_NAME,
                            format!("database \"{database}\" does not exist"),
                        ),
                        Err(e) => e,
                    }
                }
                Login::NotAdmin(user) => {
                    match authenticate(&mut stream_ok, &user.secret, &user.name, &mut out).await {
                        Ok(()) => PgError::fatal(
                            sqlstate::INVALID_AUTHORIZATION,
                            format!(
                                "user \"{}\" may not use the admin console (database \"{}\"): it is not in admin.users",
                                user.name,
                                shared.admin.settings().database
                            ),
                        ),
                        Err(e) => e,
                    }
                }
                Login::Known(_) | Login::Console(_) => auth_failed(""),
            };
            if left_during_auth(&e) {
                tracing::debug!(%peer, error = %e, "client refused at login");
            } else {
                tracing::info!(%peer, error = %e, "client refused at login");
            }
            report(&mut stream_ok, &e).await;
            Outcome::Done
        }
        Ok(None) => Outcome::Done,
        Err(e) => {
            if e.code != sqlstate::INVALID_CATALOG_NAME {
                tracing::info!(%peer, error = %e, "client refused at startup");
            }
            report(&mut stream_ok, &e).await;
            Outcome::Done
        }
    }
}

async fn report(stream: &mut Stream, e: &PgError) {
    let mut out = BytesMut::new();
    e.encode(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
}

type Params = Vec<(String, String)>;
type Startup = (Login, Params, u16);

/// Whom a StartupMessage names.
enum Login {
    Known(Arc<UserEntry>),
    /// No such role: answered as a wrong password after a mock exchange.
    UnknownRole(String),
    /// A known role (one of its entries, for its secret) and a database it
    /// has none for: answered after authentication.
    UnknownDatabase(Arc<UserEntry>, String),
    /// An admin user asking for the console database (one of its entries,
    /// for its secret).
    Console(Arc<UserEntry>),
    /// A known user asking for the console database who is no admin:
    /// refused (28000) after authentication.
    NotAdmin(Arc<UserEntry>),
}

/// Negotiates TLS and reads the StartupMessage; `Ok(None)` after a CancelRequest.
/// Returns the stream unless a failed TLS handshake consumed it.
async fn handshake(
    shared: &Arc<Shared>,
    mut stream: Stream,
) -> (Option<Stream>, Result<Option<Startup>, PgError>) {
    loop {
        let packet = match read_startup_packet(&mut stream).await {
            Ok(p) => p,
            Err(e) => return (Some(stream), Err(e)),
        };
        let parsed = match startup::parse(&packet) {
            Ok(p) => p,
            Err(e) => {
                return (
                    Some(stream),
                    Err(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string())),
                )
            }
        };
        let answer: &[u8] = match parsed {
            StartupPacket::SslRequest if shared.tls.is_some() && !stream.is_tls() => b"S",
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => b"N",
            StartupPacket::Cancel { pid, secret } => {
                shared.clients.cancel(pid, secret);
                return (Some(stream), Ok(None));
            }
            StartupPacket::Startup { .. } if shared.tls_required && !stream.is_tls() => {
                return (
                    Some(stream),
                    Err(PgError::fatal(
                        sqlstate::INVALID_AUTHORIZATION,
                        "this proxy accepts only TLS connections (tls.mode = \"require\"): connect with sslmode=require",
                    )),
                );
            }
            StartupPacket::Startup { minor, params } => {
                let result = find_user(shared, params).map(|(u, p)| Some((u, p, minor)));
                return (Some(stream), result);
            }
        };
        if let Err(e) = stream.write_all(answer).await {
            return (Some(stream), Err(io_fatal(e)));
        }
        if answer == b"S" {
            let (Some(acceptor), Stream::Plain(tcp)) = (&shared.tls, stream) else {
                return (None, Ok(None));
            };
            match acceptor.accept(tcp).await {
                Ok(tls) => stream = Stream::ServerTls(Box::new(tls)),
                Err(e) => {
                    tracing::info!(error = %e, "client TLS handshake failed");
                    return (None, Ok(None));
                }
            }
        }
    }
}

fn find_user(shared: &Shared, params: Vec<(String, String)>) -> Result<(Login, Params), PgError> {
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let user = get("user").ok_or_else(|| {
        PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "no user name specified in startup packet",
        )
    })?;
    let database = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    let console = shared.admin.console_database().as_deref() == Some(database.as_str());
    if !console {
        if let Some(e) = shared.users.get(&(user.clone(), database.clone())) {
            return Ok((Login::Known(e.clone()), params));
        }
    }
    // A role's first entry (by database name) holds its secret for the
    // console and for a database it has no entry for.
    let same_role = shared
        .users
        .iter()
        .filter(|((u, _), _)| *u == user)
        .min_by(|a, b| a.0 .1.cmp(&b.0 .1))
        .map(|(_, e)| e.clone());
    Ok(match same_role {
        Some(e) if console && shared.admin.is_admin(&user) => (Login::Console(e), params),
        Some(e) if console => (Login::NotAdmin(e), params),
        Some(e) => (Login::UnknownDatabase(e, database), params),
        None => (Login::UnknownRole(user), params),
    })
}

fn io_fatal(e: std::io::Error) -> PgError {
    PgError::fatal(
        sqlstate::CONNECTION_FAILURE,
        format!("client connection: {e}"),
    )
}

const LEFT_DURING_AUTH: &str = "client closed the connection during authentication";

/// A client that closes the connection when asked for a password is not
/// refused: psql does it to prompt for one, and `pg_isready` (a container's
/// health check) does it every few seconds. Logged at debug, not info.
fn left_during_auth(e: &PgError) -> bool {
    e.code == sqlstate::CONNECTION_FAILURE && e.message == LEFT_DURING_AUTH
}

async fn login(
    shared: &Arc<Shared>,
    mut stream: Stream,
    user: Arc<UserEntry>,
    params: Vec<(String, String)>,
    minor: u16,
    peer: SocketAddr,
    ending: Arc<crate::clients::Ending>,
) -> Result<Outcome, (Stream, PgError)> {
    let mut out = BytesMut::with_capacity(512);
    if minor > 0 {
        let unsupported: Vec<&str> = params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.as_str())
            .collect();
        backend::negotiate_protocol_version(&mut out, 0, &unsupported);
    }
    if let Err(e) = authenticate(&mut stream, &user.secret, &user.name, &mut out).await {
        if left_during_auth(&e) {
            tracing::debug!(%peer, user = %user.name, "client left during authentication");
        } else {
            tracing::info!(%peer, user = %user.name, "authentication failed");
        }
        return Err((stream, e));
    }
    backend::auth_request(&mut out, 0, &[]);
    let server_params = match shared.server_params(&user).await {
        Ok(p) => p,
        Err(e) => {
            return Err((
                stream,
                PgError {
                    severity: backend::Severity::Fatal,
                    ..e
                },
            ))
        }
    };
    // What the session runs with: the client's settings (parameters or
    // `options=-c ...`, the last one winning) over the servers' defaults.
    // The servers' own reports of them follow with the first statement.
    let settings = crate::server::vars::startup_settings(&params);
    for (k, v) in server_params.iter() {
        let v = settings
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map_or(v.as_str(), |(_, cv)| cv.as_str());
        backend::parameter_status(&mut out, k, v);
    }
    let registration = shared
        .clients
        .register(client_info(&stream, &user, &params, peer, false), ending);
    backend::backend_key_data(&mut out, registration.pid, registration.secret);
    backend::ready_for_query(&mut out, b'I');
    if let Err(e) = stream.write_all(&out).await {
        return Err((stream, io_fatal(e)));
    }
    tracing::debug!(%peer, user = %user.name, database = %user.database, "client logged in");
    Ok(Outcome::LoggedIn(
        LoggedIn {
            stream,
            user,
            params,
            peer,
        },
        registration,
    ))
}

fn client_info(
    stream: &Stream,
    user: &UserEntry,
    params: &[(String, String)],
    peer: SocketAddr,
    console: bool,
) -> crate::clients::ClientInfo {
    let application_name = params
        .iter()
        .find(|(k, _)| k == "application_name")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    crate::clients::ClientInfo {
        user: user.name.clone(),
        database: if console {
            String::new()
        } else {
            user.database.clone()
        },
        peer,
        local: stream.tcp().local_addr().ok(),
        application_name,
        tls: stream.is_tls(),
        console,
    }
}

/// Logs an admin in to the console: authentication as for any client,
/// then the parameters psql and drivers expect, with the version of the
/// servers behind (when a pool has learned it) so clients pick their
/// dialect right.
async fn console_login(
    shared: &Arc<Shared>,
    mut stream: Stream,
    user: Arc<UserEntry>,
    params: Vec<(String, String)>,
    peer: SocketAddr,
    ending: Arc<crate::clients::Ending>,
) -> Result<Outcome, (Stream, PgError)> {
    let mut out = BytesMut::with_capacity(512);
    if let Err(e) = authenticate(&mut stream, &user.secret, &user.name, &mut out).await {
        if !left_during_auth(&e) {
            tracing::info!(%peer, user = %user.name, "admin console: authentication failed");
        }
        return Err((stream, e));
    }
    backend::auth_request(&mut out, 0, &[]);
    let version = user
        .pools
        .shards
        .iter()
        .flat_map(|s| s.nodes.iter())
        .find_map(|p| p.known_param("server_version"))
        .unwrap_or_else(|| "15".into());
    for (k, v) in [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", "shardline"),
    ] {
        backend::parameter_status(&mut out, k, v);
    }
    let mut info = client_info(&stream, &user, &params, peer, true);
    info.database = shared.admin.settings().database;
    let registration = shared.clients.register(info, ending);
    backend::backend_key_data(&mut out, registration.pid, registration.secret);
    backend::ready_for_query(&mut out, b'I');
    if let Err(e) = stream.write_all(&out).await {
        return Err((stream, io_fatal(e)));
    }
    tracing::info!(%peer, user = %user.name, "admin console login");
    Ok(Outcome::Console(stream, registration))
}

/// Reads the client's PasswordMessage / SASL response.
async fn read_password(stream: &mut Stream) -> Result<bytes::Bytes, PgError> {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        match next_frame(&mut buf, 10_000) {
            Ok(Some(f)) if f.tag == frontend::PASSWORD => return Ok(f.bytes.slice(5..)),
            Ok(Some(f)) => {
                return Err(PgError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!(
                        "expected password response, got message type {}",
                        f.tag as char
                    ),
                ))
            }
            Ok(None) => {}
            Err(e) => return Err(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string())),
        }
        if stream.read_buf(&mut buf).await.map_err(io_fatal)? == 0 {
            return Err(PgError::fatal(
                sqlstate::CONNECTION_FAILURE,
                LEFT_DURING_AUTH,
            ));
        }
    }
}

fn auth_failed(user: &str) -> PgError {
    PgError::fatal(
        sqlstate::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    )
}

async fn send(stream: &mut Stream, out: &mut BytesMut) -> Result<(), PgError> {
    stream.write_all(out).await.map_err(io_fatal)?;
    out.clear();
    Ok(())
}

async fn authenticate(
    stream: &mut Stream,
    secret: &Secret,
    name: &str,
    out: &mut BytesMut,
) -> Result<(), PgError> {
    match secret {
        Secret::Trust => Ok(()),
        Secret::Md5 { hash } => {
            let mut salt = [0u8; 4];
            rand::fill(&mut salt);
            backend::auth_request(out, 5, &salt);
            send(stream, out).await?;
            let response = read_password(stream).await?;
            let response = response.strip_suffix(b"\0").unwrap_or(&response);
            if md5::verify(hash, salt, response) {
                Ok(())
            } else {
                Err(auth_failed(name))
            }
        }
        Secret::Scram(verifier) => {
            let mut mechanisms = Vec::new();
            mechanisms.extend_from_slice(scram::MECHANISM.as_bytes());
            mechanisms.extend_from_slice(b"\0\0");
            backend::auth_request(out, 10, &mechanisms);
            send(stream, out).await?;
            let initial = read_password(stream).await?;
            let mut r = Reader::new(&initial);
            let malformed = || {
                PgError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "malformed SASLInitialResponse",
                )
            };
            let mechanism = r.str().ok_or_else(malformed)?;
            let len = r.i32().ok_or_else(malformed)?;
            let data = if len < 0 {
                &[][..]
            } else {
                r.bytes(len as usize).ok_or_else(malformed)?
            };
            let (exchange, server_first) = scram::ServerExchange::start(verifier, mechanism, data)
                .map_err(|e| match e {
                    scram::ScramError::Mechanism(_)
                    | scram::ScramError::Malformed(_)
                    | scram::ScramError::ChannelBinding => {
                        PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string())
                    }
                    scram::ScramError::BadProof => auth_failed(name),
                })?;
            backend::auth_request(out, 11, server_first.as_bytes());
            send(stream, out).await?;
            let client_final = read_password(stream).await?;
            let server_final = exchange
                .finish(&client_final)
                .map_err(|_| auth_failed(name))?;
            backend::auth_request(out, 12, server_final.as_bytes());
            Ok(())
        }
    }
}
