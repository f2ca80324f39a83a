//! Hiding moved rows on their old shard (online cutover).
//!
//! Deleting the moved rows is most of the work of a cutover, and clients
//! wait while it runs. Instead, with the proxies paused, each old shard
//! gets a row-level security policy that shows the proxies' roles only the
//! rows the new config places there: the moved rows stay until they are
//! deleted after the proxies resume, but no statement through a proxy sees
//! or changes them. The policy and the table's row-security flags are
//! removed once the rows are gone.
//!
//! Used only where it is exact: the tool logs in as a superuser (it sees
//! and deletes the hidden rows, and may alter any table), no proxy role is
//! a superuser or has `BYPASSRLS` (they would see the hidden rows), and
//! the table is a plain table without row security of its own (turning it
//! off again restores it as it was). Otherwise the rows are deleted while
//! the proxies are paused.

/// The restrictive policy that hides the moved rows.
pub const POLICY: &str = "shardline_moved";

/// The permissive policy that lets every role see every other row (with
/// row security on, a table without one shows nothing).
pub const POLICY_ALL: &str = "shardline_moved_all";

/// Whether the rows of `$2` (table names, quoted) may be hidden from the
/// roles `$1`: see the module's conditions.
pub const CAN_HIDE_SQL: &str = "
SELECT coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false)
   AND NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = ANY ($1::text[]) AND (rolsuper OR rolbypassrls))
   AND NOT EXISTS (SELECT 1 FROM unnest($2::text[]) t
                     LEFT JOIN pg_class c ON c.oid = to_regclass(t)
                    WHERE c.oid IS NULL OR c.relkind <> 'r' OR c.relrowsecurity OR c.relforcerowsecurity
                       OR EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid))";

/// Tables of this server whose moved rows are hidden (quoted names).
pub const HIDDEN_SQL: &str = "SELECT format('%I.%I', n.nspname, c.relname)
  FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE p.polname = 'shardline_moved' ORDER BY 1";

/// Hides the rows of `t` (a quoted name) for which `stays` (a condition
/// on its row) is not true, from every role subject to row security:
/// reads skip them, writes cannot reach them or create such rows.
pub fn hide_sql(t: &str, stays: &str) -> String {
    format!(
        "ALTER TABLE {t} ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY {POLICY_ALL} ON {t} AS PERMISSIVE FOR ALL TO PUBLIC USING (true) WITH CHECK (true);
CREATE POLICY {POLICY} ON {t} AS RESTRICTIVE FOR ALL TO PUBLIC USING (coalesce({stays}, false)) WITH CHECK (coalesce({stays}, false))"
    )
}

/// Undoes [`hide_sql`] (the table had no row security before it).
pub fn unhide_sql(t: &str) -> String {
    format!(
        "DROP POLICY IF EXISTS {POLICY} ON {t};
DROP POLICY IF EXISTS {POLICY_ALL} ON {t};
ALTER TABLE {t} NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::quote_table;

    #[test]
    fn hiding_names_both_policies_and_quotes_the_table() {
        let sql = hide_sql(&quote_table("app.Users"), "id = 1");
        assert!(sql.starts_with("ALTER TABLE \"app\".\"Users\" ENABLE ROW LEVEL SECURITY, FORCE"));
        assert!(
            sql.contains("CREATE POLICY shardline_moved_all ON \"app\".\"Users\" AS PERMISSIVE")
        );
        assert!(sql.contains(
            "CREATE POLICY shardline_moved ON \"app\".\"Users\" AS RESTRICTIVE FOR ALL TO PUBLIC USING (coalesce(id = 1, false)) WITH CHECK (coalesce(id = 1, false))"
        ));
        let undo = unhide_sql("app.\"Users\"");
        for p in [POLICY, POLICY_ALL] {
            assert!(undo.contains(&format!("DROP POLICY IF EXISTS {p} ON app.\"Users\";")));
        }
        assert!(undo.ends_with("NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY"));
        assert!(HIDDEN_SQL.contains(&format!("'{POLICY}'")));
    }
}
