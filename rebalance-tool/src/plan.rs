//! `plan`: what would move, counted on the servers, changing nothing.

use crate::db::{self, Login, OnShard as _, Servers};
use crate::layout::Rebalance;
use anyhow::Result;
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, Serialize)]
pub struct PlanReport {
    pub run: String,
    pub old_shards: Vec<String>,
    pub new_shards: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Hash ranges changing owner, per pair (ring groups).
    pub ranges: Vec<RangeMove>,
    pub tables: Vec<TableMove>,
    pub reference: Vec<ReferenceCopy>,
    /// Rows not where the old config places them (moving them is refused).
    pub misplaced: Vec<Misplaced>,
    /// Runs recorded on the servers (an unfinished move).
    pub recorded: Vec<db::RecordedRun>,
    /// Tables missing on a shard: `(table, shard)` (apply creates them on
    /// new shards with `--create-tables`).
    pub missing: Vec<(String, String)>,
    pub total_rows: i64,
    pub total_bytes: i64,
}

#[derive(Debug, Serialize)]
pub struct RangeMove {
    /// The group of co-located tables (`default` for the default group).
    pub group: String,
    pub from: String,
    pub to: String,
    pub ranges: usize,
    /// Share of the 64-bit hash space, 0..1.
    pub share: f64,
}

#[derive(Debug, Serialize)]
pub struct TableMove {
    pub table: String,
    pub from: String,
    pub to: String,
    pub rows: i64,
    pub bytes: i64,
}

#[derive(Debug, Serialize)]
pub struct ReferenceCopy {
    pub table: String,
    pub to: String,
    pub rows: i64,
}

#[derive(Debug, Serialize)]
pub struct Misplaced {
    pub table: String,
    pub shard: String,
    pub rows: i64,
}

pub async fn plan(r: &Rebalance, login: &Login) -> Result<PlanReport> {
    let all: Vec<usize> = (0..r.names.len()).collect();
    let servers = Servers::connect(&r.names, &r.primaries, &all, login).await?;
    let names = |ids: &[usize]| ids.iter().map(|&i| r.names[i].clone()).collect::<Vec<_>>();
    let mut report = PlanReport {
        run: r.run.clone(),
        old_shards: r.old.shards.clone(),
        new_shards: r.new.shards.clone(),
        added: names(&r.added()),
        removed: names(&r.removed()),
        ranges: Vec::new(),
        tables: Vec::new(),
        reference: Vec::new(),
        misplaced: Vec::new(),
        recorded: db::recorded_runs(&servers, &all).await?,
        missing: Vec::new(),
        total_rows: 0,
        total_bytes: 0,
    };
    let mut pairs: Vec<RangeMove> = Vec::new();
    for (g, first, last, from, to) in r.moving_ranges() {
        let width = (last as i128 - first as i128 + 1) as f64 / 2f64.powi(64);
        let (from, to) = (r.names[from].clone(), r.names[to].clone());
        let group = r.group_name(g);
        match pairs
            .iter_mut()
            .find(|p| p.group == group && p.from == from && p.to == to)
        {
            Some(p) => {
                p.ranges += 1;
                p.share += width;
            }
            None => pairs.push(RangeMove {
                group,
                from,
                to,
                ranges: 1,
                share: width,
            }),
        }
    }
    pairs.sort_by(|a, b| (&a.group, &a.from, &a.to).cmp(&(&b.group, &b.from, &b.to)));
    report.ranges = pairs;

    for t in r.tables() {
        let (old, new) = (r.old_owner_sql(t), r.new_owner_sql(t));
        let (present, missing) = db::present_on(&servers, &all, &t.name).await?;
        for id in missing {
            report.missing.push((t.name.clone(), r.names[id].clone()));
        }
        let everywhere = db::owner_counts_on(&servers, &present, &t.name, &old, &new).await?;
        let moving = db::moving_pairs(&present, &everywhere);
        for (id, counts) in present.into_iter().zip(everywhere) {
            for c in counts {
                let db::OwnerCount {
                    old: from,
                    new: to,
                    rows,
                    bytes,
                } = c;
                // Already where the new config places them (an earlier
                // run moved them), with nothing more to move there from
                // their old shard: not misplaced, as apply sees them.
                let moved_here = c.moved_to(id, &moving);
                if from != Some(id as i32) && !moved_here {
                    report.misplaced.push(Misplaced {
                        table: t.name.clone(),
                        shard: r.names[id].clone(),
                        rows,
                    });
                    continue;
                }
                if moved_here {
                    continue;
                }
                let Some(to) = to.map(|v| v as usize).filter(|&to| to != id) else {
                    continue;
                };
                report.total_rows += rows;
                report.total_bytes += bytes;
                report.tables.push(TableMove {
                    table: t.name.clone(),
                    from: r.names[id].clone(),
                    to: r.names[to].clone(),
                    rows,
                    bytes,
                });
            }
        }
    }
    let home = r.home();
    for table in &r.old.reference {
        let c = servers.get(home).await?;
        let rows: i64 = c
            .query_one(
                &format!("SELECT count(*) FROM {}", crate::layout::quote_table(table)),
                &[],
            )
            .await
            .on(&servers, home, &format!("counting rows of {table}"))?
            .get(0);
        for to in r.added() {
            report.reference.push(ReferenceCopy {
                table: table.clone(),
                to: r.names[to].clone(),
                rows,
            });
        }
    }
    Ok(report)
}

/// Thousands separated, for tables people read.
pub fn count(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

pub fn bytes(n: i64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.1} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.1} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n} B"),
    }
}

/// Lines of a left-aligned table, numbers right-aligned (columns whose
/// header starts with a space).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].trim().len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::from("  ");
        for (i, c) in cells.iter().enumerate() {
            let w = widths[i];
            if header[i].starts_with(' ') {
                let _ = write!(l, "{c:>w$}  ");
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| h.trim()).collect(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

impl PlanReport {
    pub fn render(&self) -> String {
        let mut out = format!(
            "Rebalance {} -> {} (run {})\n",
            self.old_shards.join(", "),
            self.new_shards.join(", "),
            self.run
        );
        if !self.added.is_empty() {
            let _ = writeln!(out, "Shards added: {}", self.added.join(", "));
        }
        if !self.removed.is_empty() {
            let _ = writeln!(
                out,
                "Shards removed: {} (all their rows move)",
                self.removed.join(", ")
            );
        }
        if !self.ranges.is_empty() {
            out.push_str("\nHash ranges changing owner (consistent hashing):\n");
            let rows: Vec<Vec<String>> = self
                .ranges
                .iter()
                .map(|p| {
                    vec![
                        p.group.clone(),
                        p.from.clone(),
                        p.to.clone(),
                        p.ranges.to_string(),
                        format!("{:.1}%", p.share * 100.0),
                    ]
                })
                .collect();
            out.push_str(&table(
                &["group", "from", "to", " ranges", " key space"],
                &rows,
            ));
        }
        out.push_str("\nRows to move (counted on the servers):\n");
        if self.tables.is_empty() {
            out.push_str("  nothing moves\n");
        } else {
            let mut rows: Vec<Vec<String>> = self
                .tables
                .iter()
                .map(|t| {
                    vec![
                        t.table.clone(),
                        t.from.clone(),
                        t.to.clone(),
                        count(t.rows),
                        bytes(t.bytes),
                    ]
                })
                .collect();
            rows.push(vec![
                "total".into(),
                String::new(),
                String::new(),
                count(self.total_rows),
                bytes(self.total_bytes),
            ]);
            out.push_str(&table(&["table", "from", "to", " rows", " bytes"], &rows));
        }
        if !self.reference.is_empty() {
            out.push_str("\nReference tables copied whole to new shards:\n");
            let rows: Vec<Vec<String>> = self
                .reference
                .iter()
                .map(|r| vec![r.table.clone(), r.to.clone(), count(r.rows)])
                .collect();
            out.push_str(&table(&["table", "to", " rows"], &rows));
        }
        if !self.missing.is_empty() {
            let missing: Vec<String> = self
                .missing
                .iter()
                .map(|(t, s)| format!("{t} on {s}"))
                .collect();
            let _ = writeln!(
                out,
                "\nTables missing (create them, or apply with --create-tables): {}",
                missing.join(", ")
            );
        }
        let this_run: Vec<&db::RecordedRun> = self
            .recorded
            .iter()
            .filter(|r| r.placement == self.run)
            .collect();
        if let Some(r) = this_run.first() {
            let _ = writeln!(
                out,
                "\nA run of this rebalance is recorded on the servers (run {}, started {}, {}): apply with these configs resumes it{}.",
                r.run,
                r.started,
                r.state,
                if r.state == "running" {
                    "; abort with them undoes it if no row was deleted yet"
                } else {
                    ""
                }
            );
        }
        for r in self.recorded.iter().filter(|r| r.placement != self.run) {
            let _ = writeln!(
                out,
                "\nShard {} records an unfinished rebalance between other configs (run {}, started {}, {}): apply refuses until it is finished or aborted with its configs.",
                r.shard, r.run, r.started, r.state
            );
        }
        if !self.misplaced.is_empty() {
            out.push_str(if this_run.is_empty() {
                "\nRows not where the old config places them (apply refuses until they are fixed):\n"
            } else {
                "\nRows not where the old config places them (the recorded run's copies, or rows to fix):\n"
            });
            let rows: Vec<Vec<String>> = self
                .misplaced
                .iter()
                .map(|m| vec![m.table.clone(), m.shard.clone(), count(m.rows)])
                .collect();
            out.push_str(&table(&["table", "on shard", " rows"], &rows));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(-1234567), "-1,234,567");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(2_500_000), "2.5 MB");
        let t = table(
            &["table", " rows"],
            &[
                vec!["users".into(), "1,000".into()],
                vec!["o".into(), "5".into()],
            ],
        );
        assert_eq!(t, "  table   rows\n  users  1,000\n  o          5\n");
    }
}
