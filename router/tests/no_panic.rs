//! The router never panics, whatever the text: arbitrary strings, SQL-ish
//! noise, and nesting deep enough to exhaust a recursive parser.

use proptest::prelude::*;
use shardline_router::{classify, hint, lexer, Class, Options, Router};

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text(text in "\\PC{0,100}") {
        let _ = classify(&text, &Options::default());
        let _ = hint::leading_hint(&text);
        let _ = hint::session_role(&text);
        for piece in lexer::split_statements(&text) {
            prop_assert!(text.contains(piece));
        }
    }

    #[test]
    fn sql_shaped_noise(text in "(SELECT|WITH|INSERT|BEGIN|SET|EXPLAIN|FOR|UPDATE|\\(|\\)|'|\"|\\$\\$|;|,|/\\*|\\*/|--|a|1| )*") {
        let mut r = Router::new(Options::default(), 16);
        let _ = r.route(&text);
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    for depth in [100, 1_000, 20_000] {
        let sql = format!("SELECT {}1{}", "(".repeat(depth), ")".repeat(depth));
        // Whatever the parser makes of it, the answer is a class, and an
        // unparseable SELECT is a write.
        let (class, _) = classify(&sql, &Options::default());
        assert!(matches!(class, Class::Read | Class::Write));
    }
}
