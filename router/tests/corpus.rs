//! Real-world statements with the class each must get. A write classified as
//! a read would send it to a replica; this corpus guards those rules.

use shardline_router::{classify, Class, Options};

fn parse_class(code: &str) -> Class {
    match code {
        "R" => Class::Read,
        "W" => Class::Write,
        "B" => Class::Begin { read_only: false },
        "BR" => Class::Begin { read_only: true },
        "ST" => Class::SetTransaction { read_only: false },
        "STR" => Class::SetTransaction { read_only: true },
        "T" => Class::TransactionControl,
        "S" => Class::Session,
        other => panic!("unknown class code {other}"),
    }
}

#[test]
fn corpus() {
    let text = include_str!("corpus.txt");
    let options = Options::default();
    let mut failures = Vec::new();
    let mut n = 0;
    for line in text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let (code, sql) = line
            .split_once('\t')
            .unwrap_or_else(|| panic!("bad corpus line: {line}"));
        let (class, source) = classify(sql, &options);
        if class != parse_class(code) {
            failures.push(format!(
                "{code:>3} expected, got {class:?} ({source:?}): {sql}"
            ));
        }
        n += 1;
    }
    assert!(n >= 150, "the corpus has {n} statements; keep at least 150");
    assert!(
        failures.is_empty(),
        "{} of {n} misclassified:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn user_functions() {
    let mut options = Options::default();
    options.writing_functions.insert("enqueue_job".into());
    assert_eq!(
        classify("SELECT enqueue_job('x')", &options).0,
        Class::Write
    );
    assert_eq!(
        classify("SELECT app.enqueue_job('x')", &options).0,
        Class::Write
    );
    assert_eq!(classify("SELECT lookup('x')", &options).0, Class::Read);
    // Strict mode: unknown functions write unless listed as read-only.
    options.unknown_functions_write = true;
    options.read_only_functions.insert("lookup".into());
    assert_eq!(classify("SELECT lookup('x')", &options).0, Class::Read);
    assert_eq!(classify("SELECT mystery('x')", &options).0, Class::Write);
}

#[test]
fn several_statements_take_the_strongest_class() {
    let o = Options::default();
    assert_eq!(classify("SELECT 1; SELECT 2", &o).0, Class::Read);
    assert_eq!(classify("SELECT 1; DELETE FROM t", &o).0, Class::Write);
    assert_eq!(classify("SET x.y = 1; SELECT 1", &o).0, Class::Read);
}

/// The route says where effects may be (`Route::effects`) for every text
/// of its shape: the proxy looks for a statement's session effects only
/// when it does, so no text with an effect may get a route without it.
#[test]
fn a_route_names_every_text_with_session_effects() {
    use shardline_router::effect::{effects, statement_effect};
    let corpus = include_str!("corpus.txt")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('\t').map(|(_, sql)| sql));
    let extra = [
        "SET search_path = app, public",
        "set time zone 'UTC'",
        "/* shardline: role=primary */ SET application_name = 'x'",
        "-- a comment\nRESET ALL",
        "DISCARD ALL",
        "DEALLOCATE PREPARE s1",
        "LISTEN jobs",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "SELECT 1; SET statement_timeout = 5",
        "SELECT 1;",
    ];
    let mut router = shardline_router::Router::new(Options::default(), 1000, None);
    let mut with_effects = 0;
    for sql in corpus.chain(extra) {
        let found = effects(sql).is_some() || statement_effect(sql).is_some();
        with_effects += usize::from(found);
        assert!(
            !found || router.route(sql).effects,
            "{sql}: has effects, its route says none"
        );
    }
    assert!(with_effects >= 8, "only {with_effects} texts with effects");
    // Texts of one shape: the first decides for the rest, whatever their
    // constants hold (a semicolon in a string is no second statement).
    assert!(!router.route("SELECT * FROM t WHERE a = 'x'").effects);
    let text = "SELECT * FROM t WHERE a = 'x; SET y = 1'";
    assert!(!router.route(text).effects && effects(text).is_none());
    assert!(router.route("SET work_mem = '4MB'").effects);
    assert!(router.route("SET work_mem = '8MB'").effects);
    assert!(
        !router
            .route("SELECT abalance FROM pgbench_accounts WHERE aid = 7")
            .effects
    );
}
