// PgJDBC with autocommit off (its default for many applications) while
// the primary of the keys' shard is down: PgJDBC sends each transaction's
// BEGIN in one unit with its first statement, which only reads here, so
// the transaction begins on a replica; a write in it fails there as in a
// read-only transaction (25006).
//
// Usage: java -cp DIR:postgresql.jar JdbcPrimaryDown URL KEY...
//   URL   jdbc:postgresql://127.0.0.1:PORT/db?user=..&password=..
//   KEY   keys of users named "user KEY" on the shard whose primary is down
import java.sql.*;

public class JdbcPrimaryDown {
    static void check(String name, boolean ok, Object detail) {
        if (!ok) throw new AssertionError(name + ": " + detail);
        System.out.println("ok " + name);
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        try (Connection c = DriverManager.getConnection(url)) {
            c.setAutoCommit(false);
            // Past prepareThreshold (5) too: a named statement's Parse with
            // the BEGIN and the Bind.
            try (PreparedStatement sel = c.prepareStatement(
                    "SELECT name, pg_is_in_recovery() FROM users WHERE id = ?")) {
                for (int round = 0; round < 3; round++) {
                    for (int i = 1; i < args.length; i++) {
                        long k = Long.parseLong(args[i]);
                        sel.setLong(1, k);
                        try (ResultSet rs = sel.executeQuery()) {
                            check("read of " + k + " in a transaction",
                                rs.next() && rs.getString(1).equals("user " + k) && rs.getBoolean(2),
                                "no row, or not from a replica");
                        }
                        c.commit();
                    }
                }
            }
            long k = Long.parseLong(args[1]);
            try (Statement s = c.createStatement()) {
                try (ResultSet rs = s.executeQuery("SELECT name FROM users WHERE id = " + k)) {
                    check("a transaction's first read", rs.next(), "no row");
                }
                try {
                    s.executeUpdate("UPDATE users SET name = name WHERE id = " + k);
                    throw new AssertionError("a write in a transaction begun on a replica");
                } catch (SQLException e) {
                    check("a write after it fails read-only", "25006".equals(e.getSQLState()), e);
                }
                c.rollback();
            }
        }
        System.out.println("all checks passed");
    }
}
