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
