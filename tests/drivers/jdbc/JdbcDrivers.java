// PgJDBC against a two-shard Shardline: prepared statements past
// prepareThreshold (a named Parse and its Bind in one unit), batches in
// autocommit (a pipeline spanning shards), a transaction on one key with a
// fetch-size cursor, rollback() after a refused statement, CopyManager.
// Every key written is read back; the caller audits each row's shard.
//
// Usage: java -cp DIR:postgresql.jar JdbcDrivers URL BASE
//   URL   jdbc:postgresql://127.0.0.1:PORT/db?user=..&password=..
import java.io.StringReader;
import java.sql.*;
import java.util.*;
import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class JdbcDrivers {
    static void check(String name, boolean ok, Object detail) {
        if (!ok) throw new AssertionError(name + ": " + detail);
        System.out.println("ok " + name);
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        long base = Long.parseLong(args[1]);
        TreeMap<Long, String> names = new TreeMap<>();
        try (Connection c = DriverManager.getConnection(url)) {
            // Past prepareThreshold (5): server-side named statements.
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO users (id, name) VALUES (?, ?)");
                 PreparedStatement sel = c.prepareStatement("SELECT name FROM users WHERE id = ?")) {
                for (long k = base; k < base + 30; k++) {
                    ins.setLong(1, k);
                    ins.setString(2, "jdbc " + k);
                    ins.executeUpdate();
                    names.put(k, "jdbc " + k);
                }
                for (long k = base; k < base + 30; k++) {
                    sel.setLong(1, k);
                    try (ResultSet rs = sel.executeQuery()) {
                        if (!rs.next() || !rs.getString(1).equals(names.get(k)))
                            throw new AssertionError("read of " + k);
                    }
                }
            }
            check("prepared statements past prepareThreshold", true, "");
            // A batch in autocommit: one pipeline, rows on both shards.
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO users (id, name) VALUES (?, ?)")) {
                for (long k = base + 100; k < base + 140; k++) {
                    ins.setLong(1, k);
                    ins.setString(2, "batch " + k);
                    ins.addBatch();
                    names.put(k, "batch " + k);
                }
                int[] counts = ins.executeBatch();
                check("batch across shards", counts.length == 40 && Arrays.stream(counts).allMatch(n -> n == 1), Arrays.toString(counts));
            }
            // A transaction on one key: write, read with a fetch-size cursor.
            c.setAutoCommit(false);
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO users (id, name) VALUES (?, ?)");
                 PreparedStatement sel = c.prepareStatement("SELECT id, name FROM users WHERE id = ?")) {
                ins.setLong(1, base + 200);
                ins.setString(2, "txn");
                ins.executeUpdate();
                sel.setFetchSize(1);
                sel.setLong(1, base + 200);
                try (ResultSet rs = sel.executeQuery()) {
                    check("fetch-size cursor in a transaction", rs.next() && rs.getLong(1) == base + 200, "");
                }
            }
            c.commit();
            names.put(base + 200, "txn");
            // Read-only transactions (setReadOnly: BEGIN READ ONLY), each
            // on its key's shard, whichever shard that is.
            c.setReadOnly(true);
            try (PreparedStatement sel = c.prepareStatement("SELECT name FROM users WHERE id = ?")) {
                for (long k = base; k < base + 4; k++) {
                    sel.setLong(1, k);
                    try (ResultSet rs = sel.executeQuery()) {
                        if (!rs.next() || !rs.getString(1).equals(names.get(k)))
                            throw new AssertionError("read-only transaction read of " + k);
                    }
                    c.commit();
                }
            }
            c.setReadOnly(false);
            check("read-only transactions on each shard", true, "");
            // A fetch-size cursor over several shards: refused, never one
            // shard's rows fetched in batches.
            for (String order : new String[] {"", " ORDER BY id"}) {
                try (Statement st = c.createStatement()) {
                    st.setFetchSize(3);
                    try (ResultSet rs = st.executeQuery("SELECT id FROM users WHERE id BETWEEN " + base + " AND " + (base + 39) + order)) {
                        int n = 0;
                        while (rs.next()) {
                            n++;
                        }
                        throw new AssertionError("expected a refusal, got " + n + " rows");
                    } catch (SQLException e) {
                        check("fetch-size cursor over several shards is refused (" + order + ")", "0A000".equals(e.getSQLState()), e.getSQLState() + " " + e.getMessage());
                    }
                }
                c.rollback();
            }
            // A statement refused inside the transaction: rollback() ends it.
            try (Statement st = c.createStatement()) {
                st.executeUpdate("INSERT INTO users (id, name) VALUES (" + (base + 201) + ", 'gone')");
                try {
                    st.executeQuery("SELECT u.id FROM users u JOIN users v ON v.name = u.name");
                    throw new AssertionError("expected a refusal");
                } catch (SQLException e) {
                    check("refused in a transaction", "0A000".equals(e.getSQLState()), e.getSQLState() + " " + e.getMessage());
                }
            }
            c.rollback();
            try (PreparedStatement sel = c.prepareStatement("SELECT count(*) FROM users WHERE id = ?")) {
                sel.setLong(1, base + 201);
                try (ResultSet rs = sel.executeQuery()) {
                    rs.next();
                    check("rollback() after the refusal", rs.getLong(1) == 0, rs.getLong(1));
                }
            }
            c.commit();
            // Batches inside a transaction (autocommit off: PgJDBC sends
            // BEGIN in the batch's unit): committed, rolled back, failed.
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO users (id, name) VALUES (?, ?)")) {
                for (long k = base + 400; k < base + 420; k++) {
                    ins.setLong(1, k);
                    ins.setString(2, "txn batch " + k);
                    ins.addBatch();
                }
                int[] counts = ins.executeBatch();
                check("batch across shards in a transaction", counts.length == 20, Arrays.toString(counts));
                // The same transaction goes on with a single-key statement.
                ins.setLong(1, base + 420);
                ins.setString(2, "txn batch " + (base + 420));
                ins.executeUpdate();
                c.commit();
                for (long k = base + 400; k <= base + 420; k++) names.put(k, "txn batch " + k);
                for (long k = base + 430; k < base + 440; k++) {
                    ins.setLong(1, k);
                    ins.setString(2, "rolled back");
                    ins.addBatch();
                }
                ins.executeBatch();
                c.rollback();
                for (long k : new long[] {base + 440, base + 441, base + 400, base + 442}) {
                    ins.setLong(1, k);
                    ins.setString(2, "dup");
                    ins.addBatch();
                }
                try {
                    ins.executeBatch();
                    throw new AssertionError("expected a unique violation");
                } catch (SQLException e) {
                    check("failing batch in a transaction", "23505".equals(e.getSQLState()), e.getSQLState());
                }
                c.rollback();
            }
            try (PreparedStatement sel = c.prepareStatement("SELECT count(*) FROM users WHERE id BETWEEN ? AND ?")) {
                sel.setLong(1, base + 430);
                sel.setLong(2, base + 449);
                try (ResultSet rs = sel.executeQuery()) {
                    rs.next();
                    check("rolled-back batches leave nothing", rs.getLong(1) == 0, rs.getLong(1));
                }
            }
            c.commit();
            c.setAutoCommit(true);
            // CopyManager: text COPY split by key.
            StringBuilder rows = new StringBuilder();
            for (long k = base + 300; k < base + 320; k++) {
                rows.append(k).append('\t').append("copy ").append(k).append('\n');
                names.put(k, "copy " + k);
            }
            CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
            long copied = copy.copyIn("COPY users (id, name) FROM STDIN", new StringReader(rows.toString()));
            check("CopyManager COPY FROM STDIN", copied == 20, copied);
            // Everything reads back by key.
            try (PreparedStatement sel = c.prepareStatement("SELECT name FROM users WHERE id = ?")) {
                for (Map.Entry<Long, String> e : names.entrySet()) {
                    sel.setLong(1, e.getKey());
                    try (ResultSet rs = sel.executeQuery()) {
                        if (!rs.next() || !rs.getString(1).equals(e.getValue()))
                            throw new AssertionError("final read of " + e.getKey());
                    }
                }
            }
            check("every key read back (" + names.size() + ")", true, "");
        }
        StringJoiner keys = new StringJoiner(",");
        for (Long k : names.keySet()) keys.add(k.toString());
        System.out.println("keys " + keys);
        System.out.println("all checks passed");
    }
}
