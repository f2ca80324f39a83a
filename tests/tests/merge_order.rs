//! The merge comparator (`shardline_router::merge`) orders values exactly as
//! a real server does: for every sort-key type, values in text and binary
//! format are decoded and every pair compared; the sign must match the
//! server's `dense_rank()` over `ORDER BY v` (and `ORDER BY v DESC NULLS
//! FIRST`). Timestamptz values are printed in a zone with daylight saving
//! time, so equal instants appear with different offsets.

use shardline_router::merge::{compare, decode, Format, Kind, Value};
use shardline_tests::{Env, EnvOptions, RawValue};
use tokio_postgres::SimpleQueryMessage;

/// (column type, values as SQL literals).
fn cases() -> Vec<(&'static str, Vec<String>)> {
    let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut ints: Vec<String> = (0..60)
        .map(|i: i64| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15u64 as i64) >> (i % 50)).to_string())
        .collect();
    ints.extend(list(&[
        "0",
        "-1",
        "1",
        "9223372036854775807",
        "-9223372036854775808",
        "NULL",
    ]));
    let small = |bits: u32| {
        let max = (1i64 << (bits - 1)) - 1;
        let mut v: Vec<String> = (0..40)
            .map(|i: i64| ((i * 7919 * 7919) % (2 * max) - max).to_string())
            .collect();
        v.extend([
            max.to_string(),
            (-max - 1).to_string(),
            "0".into(),
            "NULL".into(),
        ]);
        v
    };
    let mut floats = list(&[
        "'NaN'",
        "'Infinity'",
        "'-Infinity'",
        "'-0'",
        "0",
        "1e-300",
        "-1e-300",
        "1e300",
        "-1e300",
        "0.1",
        "0.30000000000000004",
        "2.5",
        "-2.5",
        "NULL",
        "'NaN'",
    ]);
    floats.extend((0..30).map(|i| format!("{}", (i as f64 * 1.37).sin() * 10f64.powi(i % 12 - 4))));
    let mut numerics = list(&[
        "'NaN'",
        "'Infinity'",
        "'-Infinity'",
        "0",
        "0.000",
        "-0.0",
        "1",
        "1.0",
        "1.00",
        "-1",
        "10",
        "9.99999999999999999999",
        "10.00000000000000000001",
        "123456789012345678901234567890.5",
        "-123456789012345678901234567890.5",
        "0.00012",
        "0.000012",
        "-0.000012",
        "20000",
        "19999.9999",
        "NULL",
    ]);
    numerics
        .extend((0..30).map(|i| format!("{}.{:03}", (i * 7307) % 20011 - 10000, (i * 37) % 1000)));
    let texts = list(&[
        "''",
        "'a'",
        "'A'",
        "'b'",
        "'B'",
        "'ab'",
        "'a b'",
        "'Zürich'",
        "'zurich'",
        "'Ålesund'",
        "'apple'",
        "'Apple'",
        "'東京'",
        "'São Paulo'",
        "'émile'",
        "'Émile'",
        "'e'",
        "'f'",
        "'😀'",
        "'~'",
        "'a' || chr(1)",
        "NULL",
        "'ß'",
        "'ss'",
    ]);
    let dates = list(&[
        "'infinity'",
        "'-infinity'",
        "'2000-01-01'",
        "'1999-12-31'",
        "'2000-03-01'",
        "'2000-02-29'",
        "'0001-01-01'",
        "'0001-01-01 BC'",
        "'0044-03-15 BC'",
        "'4713-01-01 BC'",
        "'9999-12-31'",
        "'1970-01-01'",
        "'2024-10-27'",
        "NULL",
        "'2100-02-28'",
        "'2100-03-01'",
        "'1900-02-28'",
        "'1900-03-01'",
        "'1600-02-29'",
    ]);
    let timestamps = list(&[
        "'infinity'",
        "'-infinity'",
        "'2000-01-01 00:00:00'",
        "'2000-01-01 00:00:00.000001'",
        "'1999-12-31 23:59:59.999999'",
        "'2024-10-27 02:30:00'",
        "'2024-10-27 01:30:00'",
        "'2024-03-31 02:30:00'",
        "'0001-01-01 00:00:00 BC'",
        "'1970-01-01 00:00:00.5'",
        "'1970-01-01 00:00:00.25'",
        "'2038-01-19 03:14:08'",
        "NULL",
        "'2000-01-01 12:00:00'",
    ]);
    let zoned = list(&[
        "'infinity'",
        "'-infinity'",
        "'2024-10-27 00:30:00+00'",
        "'2024-10-27 01:30:00+00'",
        "'2024-10-27 00:59:59.999999+00'",
        "'2024-10-27 01:00:00+00'",
        "'2024-03-31 00:59:59+00'",
        "'2024-03-31 01:00:00+00'",
        "'2024-10-27 02:30:00+02'",
        "'2000-01-01 00:00:00+05:30'",
        "'1999-12-31 19:00:00-05'",
        "'0100-01-01 00:00:00+00 BC'",
        "'1900-01-01 00:00:00+00'",
        "NULL",
        "'1893-04-01 00:00:00+00'",
    ]);
    let uuids = list(&[
        "'00000000-0000-0000-0000-000000000000'",
        "'ffffffff-ffff-ffff-ffff-ffffffffffff'",
        "'7fffffff-0000-0000-0000-000000000000'",
        "'80000000-0000-0000-0000-000000000000'",
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12'",
        "NULL",
    ]);
    vec![
        ("bool", list(&["true", "false", "NULL", "true"])),
        ("int8", ints),
        ("int4", small(32)),
        ("int2", small(16)),
        (
            "oid",
            list(&[
                "0",
                "1",
                "2147483647",
                "2147483648",
                "4294967295",
                "3000000000",
                "NULL",
            ]),
        ),
        ("float8", floats.clone()),
        (
            "float4",
            floats
                .iter()
                .map(|f| f.replace("e300", "e30").replace("e-300", "e-30"))
                .collect(),
        ),
        ("numeric", numerics),
        ("text", texts.clone()),
        ("varchar(20)", texts.clone()),
        ("text COLLATE \"C\"", texts.clone()),
        (
            "char(6)",
            list(&[
                "'a'",
                "'a' || chr(9)",
                "'a  '",
                "'ab'",
                "''",
                "' '",
                "'a!'",
                "'A'",
                "NULL",
                "'zz'",
            ]),
        ),
        ("name", texts.into_iter().filter(|t| t != "NULL").collect()),
        ("date", dates),
        ("timestamp", timestamps),
        ("timestamptz", zoned),
        ("uuid", uuids),
    ]
}

/// Every pair's order agrees with the server's ranks.
fn check(
    ty: &str,
    format: Format,
    values: &[(Option<Value>, i64)],
    descending: bool,
    nulls_first: bool,
) {
    for (a, ra) in values {
        for (b, rb) in values {
            let ours = compare(a.as_ref(), b.as_ref(), descending, nulls_first);
            assert_eq!(
                ours,
                ra.cmp(rb),
                "{ty} ({format:?}, descending {descending}): {a:?} vs {b:?}, server ranks {ra} and {rb}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_comparator_orders_like_the_server() {
    let env = Env::start_with(EnvOptions {
        shards: 1,
        replicas_per_shard: 0,
        ..Default::default()
    })
    .await
    .expect("a server");
    let c = env.connect_shard(0).await;
    c.batch_execute("SET TimeZone = 'Europe/Berlin'")
        .await
        .unwrap();
    let mut cases = cases();
    // C.UTF-8 orders by code point, as bytes do: checked where the system has it.
    if let Some(row) = c
        .query_opt("SELECT collname::text FROM pg_collation WHERE collname IN ('C.utf8', 'C.UTF-8') LIMIT 1", &[])
        .await
        .unwrap()
    {
        let name: String = row.get(0);
        let texts = cases.iter().find(|c| c.0 == "text").unwrap().1.clone();
        println!("also under collation {name}");
        cases.push((Box::leak(format!("text COLLATE \"{name}\"").into_boxed_str()), texts));
    }
    let mut checked = 0;
    for (i, (ty, values)) in cases.into_iter().enumerate() {
        let table = format!("v{i}");
        let rows: Vec<String> = values.iter().map(|v| format!("({v})")).collect();
        c.batch_execute(&format!(
            "CREATE TABLE {table} (v {ty}); INSERT INTO {table} VALUES {};",
            rows.join(", ")
        ))
        .await
        .unwrap_or_else(|e| panic!("{ty}: {e}"));
        for (descending, nulls_first, order) in
            [(false, false, "v"), (true, true, "v DESC NULLS FIRST")]
        {
            let sql = format!("SELECT v, dense_rank() OVER (ORDER BY {order}) FROM {table}");
            // Binary, with the column's type from the statement.
            let stmt = c.prepare(&sql).await.unwrap();
            let kind = Kind::of_type(stmt.columns()[0].type_().oid())
                .unwrap_or_else(|| panic!("{ty}: no kind"));
            let binary: Vec<(Option<Value>, i64)> = c
                .query(&stmt, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    let v = r
                        .get::<_, RawValue>(0)
                        .0
                        .map(|b| decode(kind, Format::Binary, &b).unwrap());
                    (v, r.get(1))
                })
                .collect();
            check(ty, Format::Binary, &binary, descending, nulls_first);
            // Text.
            let text: Vec<(Option<Value>, i64)> = c
                .simple_query(&sql)
                .await
                .unwrap()
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(r) => Some((
                        r.get(0)
                            .map(|s| decode(kind, Format::Text, s.as_bytes()).unwrap()),
                        r.get(1).unwrap().parse().unwrap(),
                    )),
                    _ => None,
                })
                .collect();
            check(ty, Format::Text, &text, descending, nulls_first);
            // Text and binary decode to the same values.
            let mut a: Vec<_> = binary.iter().map(|x| x.1).collect();
            let mut b: Vec<_> = text.iter().map(|x| x.1).collect();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "{ty}");
            checked += binary.len() + text.len();
        }
    }
    println!("checked {checked} values");
    assert!(checked > 1000, "{checked}");
}
