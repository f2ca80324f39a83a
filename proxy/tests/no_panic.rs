//! No input makes the proxy's parsers panic: arbitrary bytes go through every
//! function that reads what a client or server sent.

use bytes::BytesMut;
use proptest::prelude::*;
use shardline::auth::scram::{ServerExchange, Verifier, MECHANISM};
use shardline::protocol::{backend, frontend, next_frame, rows, startup};
use shardline_router::effect as sql;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2000,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn framing_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300), max in 0usize..400) {
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(frame)) = next_frame(&mut buf, max) {
            let declared = i32::from_be_bytes([frame.bytes[1], frame.bytes[2], frame.bytes[3], frame.bytes[4]]) as usize;
            prop_assert_eq!(frame.bytes.len(), declared + 1);
            prop_assert!(frame.bytes.len() <= max);
        }
    }

    #[test]
    fn message_readers_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = frontend::parse(&body);
        let _ = frontend::bind(&body);
        let _ = frontend::target(&body, "Describe");
        let _ = frontend::execute_portal(&body);
        let _ = frontend::query(&body);
        let _ = backend::parse_error_fields(&body);
        let _ = backend::command_tag(&body);
        let _ = startup::packet_len(&body);
        let _ = startup::parse(&body);
        // Shards' RowDescription and DataRow messages, read for merges.
        let _ = rows::row_description(&body);
        let _ = rows::row_values(&body);
        let visible = body.first().map_or(0, |&b| b as usize % 8);
        let numeric = vec![visible / 2];
        let _ = rows::client_row_description(&body, &shardline_router::gather::ClientColumns { visible, numeric });
    }

    #[test]
    fn session_sql_never_panics(text in "\\PC{0,120}") {
        let _ = sql::effects(&text);
        let _ = sql::statement_effect(&text);
    }

    #[test]
    fn sql_with_quotes_and_comments_never_panics(text in "[a-zA-Z0-9 ;'\"$/*\\-\\\\\n]{0,80}") {
        let _ = sql::effects(&text);
    }

    #[test]
    fn scram_never_panics(first in proptest::collection::vec(any::<u8>(), 0..120), last in proptest::collection::vec(any::<u8>(), 0..120)) {
        let verifier = Verifier::parse("SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$3fTNT6Ui8CZZNL0HXw3/8Zd8RqnBOGB+NCJp1cpBHnw=:ZDiRC8Le0lNOAUx/8sXbtxBsmX4dm3wgDU4mdL2MqYs=").unwrap();
        if let Ok((exchange, _)) = ServerExchange::start(&verifier, MECHANISM, &first) {
            let _ = exchange.finish(&last);
        }
        let _ = ServerExchange::start(&verifier, MECHANISM, b"n,,n=,r=abc").map(|(e, _)| e.finish(&last));
    }
}
