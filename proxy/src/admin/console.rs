//! One admin console connection, after its login (`session/startup.rs`):
//! simple queries in, replies built here and encoded with the `pgwire`
//! crate's message types. The extended protocol is refused (as
//! PgBouncer's console does): each of its units gets one error.

use super::command::{self, Command};
use super::views::{self, Table};
use crate::clients::Registration;
use crate::protocol::backend::sqlstate;
use crate::protocol::{frontend, next_frame};
use crate::stream::Stream;
use crate::Shared;
use bytes::{BufMut, BytesMut};
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription, FORMAT_CODE_TEXT};
use pgwire::messages::response::{
    CommandComplete, ErrorResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::Message;
use shardline_router::sharding::ShardMask;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A console statement's failure: SQLSTATE and message.
struct Failure(&'static str, String);

/// Runs the console for a logged-in admin until it leaves.
pub async fn serve(shared: Arc<Shared>, mut stream: Stream, registration: Registration) {
    let mut shutdown = shared.admin.shutdown_requests();
    let mut input = BytesMut::with_capacity(1024);
    let mut out = BytesMut::with_capacity(4096);
    // An extended-protocol unit was refused: the rest of it up to Sync is skipped.
    let mut skipping = false;
    loop {
        loop {
            let frame = match next_frame(&mut input, shared.max_message_size) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    error(
                        &mut out,
                        "FATAL",
                        sqlstate::PROTOCOL_VIOLATION,
                        &e.to_string(),
                    );
                    let _ = stream.write_all(&out).await;
                    return;
                }
            };
            match frame.tag {
                frontend::QUERY => {
                    let text = frontend::query(frame.body())
                        .ok()
                        .and_then(|t| std::str::from_utf8(t).ok())
                        .unwrap_or("")
                        .to_string();
                    run_query(&shared, &text, &mut out).await;
                    ready(&mut out);
                }
                frontend::TERMINATE => return,
                frontend::SYNC => {
                    skipping = false;
                    ready(&mut out);
                }
                frontend::FLUSH => {}
                _ if skipping => {}
                _ => {
                    skipping = true;
                    error(
                        &mut out,
                        "ERROR",
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console takes simple queries only (psql, or a driver's simple query protocol), not the extended protocol",
                    );
                }
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
                return;
            }
            out.clear();
        }
        let killed = registration.slot.ending.fired(crate::clients::Ending::KILL);
        tokio::select! {
            read = stream.read_buf(&mut input) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            () = killed => {
                error(&mut out, "FATAL", sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command");
                let _ = stream.write_all(&out).await;
                return;
            }
            Ok(()) = shutdown.changed() => {
                error(&mut out, "FATAL", sqlstate::ADMIN_SHUTDOWN, "terminating connection because the proxy is shutting down");
                let _ = stream.write_all(&out).await;
                return;
            }
        }
    }
}

/// Runs each statement of a simple query; an error ends the query there,
/// as Postgres does.
async fn run_query(shared: &Arc<Shared>, text: &str, out: &mut BytesMut) {
    // The console shows (and acts on) the running configuration, reloaded or not.
    let current = shared.admin.live().map(|l| l.current());
    let shared = current.as_ref().unwrap_or(shared);
    let statements = command::statements(text);
    if statements.is_empty() {
        // EmptyQueryResponse: a tag and no body.
        out.put_u8(b'I');
        out.put_i32(4);
        return;
    }
    for statement in statements {
        let result = match command::parse(statement) {
            Ok(c) => run(shared, c).await,
            Err(e) => Err(Failure(sqlstate::SYNTAX_ERROR, e)),
        };
        match result {
            Ok(Reply::Table(table, tag)) => {
                write_table(out, &table);
                complete(out, tag);
            }
            Ok(Reply::Done(tag)) => complete(out, tag),
            Ok(Reply::Notices(lines, tag)) => {
                for line in lines {
                    encode(
                        out,
                        &pgwire::messages::response::NoticeResponse::new(vec![
                            (b'S', "NOTICE".into()),
                            (b'V', "NOTICE".into()),
                            (b'C', "00000".into()),
                            (b'M', line),
                        ]),
                    );
                }
                complete(out, tag);
            }
            Err(Failure(code, message)) => {
                tracing::info!(statement = statement.trim(), code, %message, "admin command failed");
                error(out, "ERROR", code, &message);
                return;
            }
        }
    }
}

enum Reply {
    Table(Table, &'static str),
    Done(&'static str),
    /// Done, with a notice per line (what a RELOAD changed).
    Notices(Vec<String>, &'static str),
}

/// SQLSTATE config_file_error.
const CONFIG_FILE_ERROR: &str = "F0000";

async fn run(shared: &Arc<Shared>, c: Command) -> Result<Reply, Failure> {
    match c {
        Command::Show(what) => Ok(Reply::Table(views::show(shared, what), "SHOW")),
        Command::Pause(shard) => {
            let mask = shards(shared, shard.as_deref())?;
            pause(shared, mask).await.map(|()| Reply::Done("PAUSE"))
        }
        Command::Resume(shard) => {
            let mask = shards(shared, shard.as_deref())?;
            if shared.admin.pause.mask() & mask == 0 {
                return Err(Failure(
                    sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("{} not paused", what(shard.as_deref())),
                ));
            }
            shared.admin.pause.resume(mask);
            tracing::info!(
                shards = shard.as_deref().unwrap_or("all"),
                "resumed by the admin console"
            );
            Ok(Reply::Done("RESUME"))
        }
        Command::Reconnect(shard) => {
            let mask = shards(shared, shard.as_deref())?;
            let mut closed = 0;
            for u in shared.users.values() {
                for (s, pools) in u.pools.shards.iter().enumerate() {
                    if mask & (1 << s) != 0 {
                        closed += pools.nodes.iter().map(|p| p.reconnect()).sum::<usize>();
                    }
                }
            }
            tracing::info!(shards = %what(shard.as_deref()), closed_idle = closed, "server connections closed by RECONNECT (those in use close when released)");
            Ok(Reply::Done("RECONNECT"))
        }
        Command::KillClient(id) => {
            let client = shared.clients.get(id).ok_or_else(|| {
                Failure(
                    sqlstate::UNDEFINED_OBJECT,
                    format!("no client has id {id} (the id column of SHOW CLIENTS)"),
                )
            })?;
            client.kill();
            tracing::info!(
                id,
                user = %client.info.user,
                peer = %client.info.peer,
                "client killed by the admin console"
            );
            Ok(Reply::Done("KILL_CLIENT"))
        }
        Command::Shutdown { wait_for_servers } => {
            let how = if wait_for_servers {
                super::Shutdown::WaitForServers
            } else {
                super::Shutdown::Now
            };
            tracing::info!(?how, "shutdown requested by the admin console");
            shared.admin.request_shutdown(how);
            Ok(Reply::Done("SHUTDOWN"))
        }
        Command::CacheClear(table) => {
            let dropped = shared.result_cache.clear(table.as_deref());
            tracing::info!(
                table = table.as_deref().unwrap_or("(all)"),
                dropped,
                "result cache cleared (CACHE CLEAR)"
            );
            Ok(Reply::Done("CACHE CLEAR"))
        }
        Command::Reload => {
            let Some(live) = shared.admin.live() else {
                return Err(Failure(
                    sqlstate::ADMIN_SHUTDOWN,
                    "the proxy is stopping".into(),
                ));
            };
            match live.reload().await {
                Ok(changes) => Ok(Reply::Notices(changes, "RELOAD")),
                Err(why) => {
                    tracing::error!(%why, "reload refused: the running configuration stays");
                    Err(Failure(
                        CONFIG_FILE_ERROR,
                        format!("reload refused, the running configuration stays: {why}"),
                    ))
                }
            }
        }
    }
}

fn what(shard: Option<&str>) -> String {
    match shard {
        Some(s) => format!("shard {s} is"),
        None => "the proxy is".into(),
    }
}

/// The shards a command names; without a name every shard, also one a
/// RELOAD adds while paused, and one it removes (a RESUME then still
/// releases the units held on it).
fn shards(shared: &Shared, name: Option<&str>) -> Result<ShardMask, Failure> {
    match name {
        None => Ok(u64::MAX),
        Some(name) => shared
            .topology
            .shards
            .iter()
            .position(|s| s.name == name)
            .map(|s| 1u64 << s)
            .ok_or_else(|| {
                let known: Vec<&str> = shared
                    .topology
                    .shards
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect();
                Failure(
                    sqlstate::UNDEFINED_OBJECT,
                    format!(
                        "no shard is named \"{name}\" (shards: {})",
                        known.join(", ")
                    ),
                )
            }),
    }
}

/// Connections of the shards in `mask` lent out now, over every user.
fn lent(shared: &Shared, mask: ShardMask) -> usize {
    shared
        .users
        .values()
        .flat_map(|u| u.pools.shards.iter().enumerate())
        .filter(|(s, _)| mask & (1 << s) != 0)
        .flat_map(|(_, p)| p.nodes.iter())
        .map(|p| p.in_use())
        .sum()
}

/// PAUSE: new transactions on the shards are held from now; returns when
/// the open ones have ended (no connection of theirs is lent). After
/// `admin.pause_timeout` it fails naming the clients still holding one,
/// and lifts the pause it set.
/// The names of the shards in `mask`, comma-separated.
fn shard_names(shared: &Shared, mask: ShardMask) -> String {
    shared
        .topology
        .shards
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, s)| s.name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

async fn pause(shared: &Arc<Shared>, mask: ShardMask) -> Result<(), Failure> {
    let before = shared.admin.pause.mask();
    shared.admin.pause.pause(mask);
    tracing::info!(
        shards = shard_names(shared, mask),
        "paused by the admin console: waiting for open transactions"
    );
    let timeout = shared.admin.settings().pause_timeout;
    let deadline = crate::timer::Instant::now() + timeout;
    // Units that looked at the mask before it was set hold their
    // connection, or are held, once `entering` is back to 0.
    while shared.admin.pause.entering() > 0 || lent(shared, mask) > 0 {
        if crate::timer::Instant::now() >= deadline {
            shared.admin.pause.resume(mask & !before);
            let holders = holders(shared, mask);
            return Err(Failure(
                sqlstate::QUERY_CANCELED,
                format!(
                    "PAUSE gave up after admin.pause_timeout ({:?}) and is lifted: clients still in a transaction: {}",
                    timeout,
                    if holders.is_empty() { "none listed (the proxy's own queries)".into() } else { holders.join("; ") }
                ),
            ));
        }
        crate::timer::sleep(Duration::from_millis(5)).await;
    }
    tracing::info!("paused: no transaction open on the paused shards");
    Ok(())
}

/// The clients using a server of the shards in `mask`, as "id (user@database
/// from peer, on server/pid)".
fn holders(shared: &Shared, mask: ShardMask) -> Vec<String> {
    let addresses: Vec<&str> = shared
        .topology
        .shards
        .iter()
        .enumerate()
        .filter(|(s, _)| mask & (1 << s) != 0)
        .flat_map(|(_, sh)| sh.nodes.iter().map(|n| n.address.as_str()))
        .collect();
    shared
        .clients
        .list()
        .into_iter()
        .filter_map(|(id, c)| {
            let on: Vec<String> = c
                .servers()
                .iter()
                .filter(|(a, _)| addresses.contains(&&**a))
                .map(|(a, pid)| format!("{a}/{pid}"))
                .collect();
            (!on.is_empty()).then(|| {
                format!(
                    "{id} ({}@{} from {}, on {})",
                    c.info.user,
                    c.info.database,
                    c.info.peer,
                    on.join(" ")
                )
            })
        })
        .collect()
}

fn encode(out: &mut BytesMut, m: &impl Message) {
    // Encoding into a growable buffer does not fail.
    let _ = m.encode(out);
}

fn ready(out: &mut BytesMut) {
    encode(out, &ReadyForQuery::new(TransactionStatus::Idle));
}

fn complete(out: &mut BytesMut, tag: &str) {
    encode(out, &CommandComplete::new(tag.to_string()));
}

fn error(out: &mut BytesMut, severity: &str, code: &str, message: &str) {
    encode(
        out,
        &ErrorResponse::new(vec![
            (b'S', severity.to_string()),
            (b'V', severity.to_string()),
            (b'C', code.to_string()),
            (b'M', message.to_string()),
        ]),
    );
}

fn write_table(out: &mut BytesMut, table: &Table) {
    let fields = table
        .columns
        .iter()
        .map(|(name, ty)| {
            let size = match ty {
                views::Type::Int8 => 8,
                views::Type::Text | views::Type::Numeric => -1,
            };
            FieldDescription::new(name.to_string(), 0, 0, ty.oid(), size, -1, FORMAT_CODE_TEXT)
        })
        .collect();
    encode(out, &RowDescription::new(fields));
    for row in &table.rows {
        let mut data = BytesMut::new();
        for value in row {
            match value {
                Some(v) => {
                    data.put_i32(v.len() as i32);
                    data.put_slice(v.as_bytes());
                }
                None => data.put_i32(-1),
            }
        }
        encode(out, &DataRow::new(data, row.len() as i16));
    }
}
