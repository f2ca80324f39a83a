//! The console's statements. Keywords are case-insensitive; a trailing
//! `;` is allowed; shard names are as configured.

/// One console statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(Show),
    Pause(Option<String>),
    Resume(Option<String>),
    Reconnect(Option<String>),
    KillClient(i32),
    Shutdown {
        wait_for_servers: bool,
    },
    Reload,
    /// CACHE CLEAR [table]: drops cached results (of one table).
    CacheClear(Option<String>),
}

/// What SHOW lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Help,
    Version,
    Config,
    Databases,
    Pools,
    Clients,
    Servers,
    Stats,
    StatsTotals,
    StatsAverages,
    Users,
    Lists,
    Mem,
    Shards,
    Routing,
    Transactions,
    ReadYourWrites,
    HotKeys,
    Skew,
    Cache,
}

impl Show {
    pub const ALL: [(&'static str, Show); 20] = [
        ("HELP", Show::Help),
        ("VERSION", Show::Version),
        ("CONFIG", Show::Config),
        ("DATABASES", Show::Databases),
        ("POOLS", Show::Pools),
        ("CLIENTS", Show::Clients),
        ("SERVERS", Show::Servers),
        ("STATS", Show::Stats),
        ("STATS_TOTALS", Show::StatsTotals),
        ("STATS_AVERAGES", Show::StatsAverages),
        ("USERS", Show::Users),
        ("LISTS", Show::Lists),
        ("MEM", Show::Mem),
        ("SHARDS", Show::Shards),
        ("ROUTING", Show::Routing),
        ("TRANSACTIONS", Show::Transactions),
        ("READ_YOUR_WRITES", Show::ReadYourWrites),
        ("HOT_KEYS", Show::HotKeys),
        ("SKEW", Show::Skew),
        ("CACHE", Show::Cache),
    ];
}

/// The console's commands, one line each, for SHOW HELP and errors.
pub const HELP: &[&str] = &[
    "SHOW HELP|VERSION|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|LISTS|MEM",
    "SHOW STATS|STATS_TOTALS|STATS_AVERAGES",
    "SHOW SHARDS|ROUTING|TRANSACTIONS|READ_YOUR_WRITES|HOT_KEYS|SKEW|CACHE",
    "PAUSE [<shard>]",
    "RESUME [<shard>]",
    "RECONNECT [<shard>]",
    "KILL_CLIENT <id>",
    "RELOAD",
    "CACHE CLEAR [<table>]",
    "SHUTDOWN [WAIT_FOR_SERVERS]",
];

/// Parses one statement; the error says what was wrong.
pub fn parse(text: &str) -> Result<Command, String> {
    let text = text.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = text.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let first = upper.first().map(String::as_str).unwrap_or("");
    let arg = || words.get(1).map(|s| s.trim_matches('"').to_string());
    let at_most = |n: usize| {
        if words.len() > n {
            Err(format!(
                "unexpected \"{}\" after {}",
                words[n],
                upper[..n].join(" ")
            ))
        } else {
            Ok(())
        }
    };
    match first {
        "SHOW" => {
            let Some(what) = upper.get(1) else {
                return Err("SHOW what? Try SHOW HELP".into());
            };
            at_most(2)?;
            Show::ALL
                .iter()
                .find(|(name, _)| name == what)
                .map(|(_, s)| Command::Show(*s))
                .ok_or_else(|| format!("unknown SHOW item \"{}\": try SHOW HELP", words[1]))
        }
        "PAUSE" => at_most(2).map(|()| Command::Pause(arg())),
        "RESUME" => at_most(2).map(|()| Command::Resume(arg())),
        "RECONNECT" => at_most(2).map(|()| Command::Reconnect(arg())),
        "KILL_CLIENT" => {
            at_most(2)?;
            let id = words
                .get(1)
                .ok_or("KILL_CLIENT needs a client id (the id column of SHOW CLIENTS)")?;
            id.parse()
                .map(Command::KillClient)
                .map_err(|_| format!("\"{id}\" is not a client id (the id column of SHOW CLIENTS)"))
        }
        "SHUTDOWN" => match upper.get(1).map(String::as_str) {
            None => Ok(Command::Shutdown {
                wait_for_servers: false,
            }),
            Some("WAIT_FOR_SERVERS") => at_most(2).map(|()| Command::Shutdown {
                wait_for_servers: true,
            }),
            Some(_) => Err(format!(
                "unexpected \"{}\" after SHUTDOWN (SHUTDOWN [WAIT_FOR_SERVERS])",
                words[1]
            )),
        },
        "RELOAD" => at_most(1).map(|()| Command::Reload),
        "CACHE" => match upper.get(1).map(String::as_str) {
            Some("CLEAR") => at_most(3).map(|()| {
                Command::CacheClear(words.get(2).map(|s| s.to_string()))
            }),
            _ => Err("CACHE what? CACHE CLEAR [<table>]".into()),
        },
        "" => Err("empty statement".into()),
        _ => Err(format!(
            "unknown command \"{}\": the console runs {}",
            words[0],
            "SHOW, PAUSE, RESUME, RECONNECT, KILL_CLIENT, RELOAD, CACHE CLEAR and SHUTDOWN (SHOW HELP lists them)"
        )),
    }
}

/// Splits a simple query's text into statements at `;` outside quotes.
pub fn statements(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut quote: Option<char> = None;
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ';') => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_in_any_case_with_or_without_semicolon() {
        assert_eq!(parse("show pools;"), Ok(Command::Show(Show::Pools)));
        assert_eq!(
            parse("SHOW stats_averages"),
            Ok(Command::Show(Show::StatsAverages))
        );
        assert_eq!(parse("PAUSE"), Ok(Command::Pause(None)));
        assert_eq!(parse("pause s1"), Ok(Command::Pause(Some("s1".into()))));
        assert_eq!(
            parse("RESUME \"s1\""),
            Ok(Command::Resume(Some("s1".into())))
        );
        assert_eq!(parse("kill_client 42"), Ok(Command::KillClient(42)));
        assert_eq!(
            parse("SHUTDOWN WAIT_FOR_SERVERS"),
            Ok(Command::Shutdown {
                wait_for_servers: true
            })
        );
        assert_eq!(parse("reload"), Ok(Command::Reload));
        assert_eq!(parse("cache clear"), Ok(Command::CacheClear(None)));
        assert_eq!(
            parse("CACHE CLEAR Countries;"),
            Ok(Command::CacheClear(Some("Countries".into())))
        );
        assert!(parse("CACHE").is_err());
        assert!(parse("CACHE CLEAR a b").is_err());
        assert_eq!(parse("show cache"), Ok(Command::Show(Show::Cache)));
    }

    #[test]
    fn mistakes_are_named() {
        assert!(parse("SHOW").unwrap_err().contains("SHOW HELP"));
        assert!(parse("SHOW FOO")
            .unwrap_err()
            .contains("unknown SHOW item \"FOO\""));
        assert!(parse("KILL_CLIENT x")
            .unwrap_err()
            .contains("\"x\" is not a client id"));
        assert!(parse("PAUSE a b").unwrap_err().contains("unexpected \"b\""));
        assert!(parse("SELECT 1")
            .unwrap_err()
            .contains("unknown command \"SELECT\""));
        assert!(parse("RELOAD now").is_err());
    }

    #[test]
    fn a_query_splits_at_semicolons_outside_quotes() {
        assert_eq!(
            statements("SHOW POOLS; SHOW CLIENTS;"),
            vec!["SHOW POOLS", " SHOW CLIENTS"]
        );
        assert_eq!(statements("PAUSE \"a;b\""), vec!["PAUSE \"a;b\""]);
        assert!(statements(" ; ").is_empty());
    }
}
