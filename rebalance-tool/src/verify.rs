//! `verify`: every row of every sharded table is on the shard the config
//! places it on, and reference tables are identical on every shard.

use crate::db::{self, Login, OnShard as _, Servers};
use crate::layout::Placement;
use crate::plan::{count, table};
use anyhow::Result;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub tables: Vec<TableCheck>,
    pub reference: Vec<ReferenceCheck>,
    /// Tables missing on some shard: `(table, shard)`.
    pub missing: Vec<(String, String)>,
}

#[derive(Debug, Serialize)]
pub struct TableCheck {
    pub table: String,
    pub shard: String,
    pub rows: i64,
    pub misplaced: i64,
    /// Where misplaced rows belong: `(shard or "nowhere", rows)`.
    pub belong: Vec<(String, i64)>,
}

#[derive(Debug, Serialize)]
pub struct ReferenceCheck {
    pub table: String,
    pub shard: String,
    pub rows: i64,
    pub checksum: String,
    /// Same rows as on the default shard.
    pub matches: bool,
}

impl VerifyReport {
    pub fn clean(&self) -> bool {
        self.missing.is_empty()
            && self.tables.iter().all(|t| t.misplaced == 0)
            && self.reference.iter().all(|r| r.matches)
    }

    pub fn misplaced(&self) -> i64 {
        self.tables.iter().map(|t| t.misplaced).sum()
    }

    pub fn render(&self) -> String {
        let mut out = String::from("Sharded tables:\n");
        let rows: Vec<Vec<String>> = self
            .tables
            .iter()
            .map(|t| {
                let belong: Vec<String> = t
                    .belong
                    .iter()
                    .map(|(s, n)| format!("{} belong on {s}", count(*n)))
                    .collect();
                vec![
                    t.table.clone(),
                    t.shard.clone(),
                    count(t.rows),
                    count(t.misplaced),
                    belong.join(", "),
                ]
            })
            .collect();
        out.push_str(&table(
            &["table", "shard", " rows", " misplaced", ""],
            &rows,
        ));
        if !self.reference.is_empty() {
            out.push_str("\nReference tables:\n");
            let rows: Vec<Vec<String>> = self
                .reference
                .iter()
                .map(|r| {
                    vec![
                        r.table.clone(),
                        r.shard.clone(),
                        count(r.rows),
                        if r.matches { "same" } else { "DIFFERS" }.into(),
                    ]
                })
                .collect();
            out.push_str(&table(
                &["table", "shard", " rows", "as on the default shard"],
                &rows,
            ));
        }
        for (t, s) in &self.missing {
            out.push_str(&format!("table {t} is missing on shard {s}\n"));
        }
        if self.clean() {
            out.push_str("\nEvery row is on its shard.\n");
        } else {
            out.push_str(&format!(
                "\n{} misplaced rows{}.\n",
                count(self.misplaced()),
                if self.reference.iter().any(|r| !r.matches) || !self.missing.is_empty() {
                    "; reference tables or tables differ"
                } else {
                    ""
                }
            ));
        }
        out
    }
}

pub async fn verify(p: &Placement, login: &Login) -> Result<VerifyReport> {
    let all: Vec<usize> = (0..p.shards.len()).collect();
    let servers = Servers::connect(&p.shards, &p.primaries, &all, login).await?;
    let mut report = VerifyReport {
        tables: Vec::new(),
        reference: Vec::new(),
        missing: Vec::new(),
    };
    for t in &p.tables {
        let owner = p.owner_sql(t);
        let (present, missing) = db::present_on(&servers, &all, &t.name).await?;
        for id in missing {
            report.missing.push((t.name.clone(), p.shards[id].clone()));
        }
        let everywhere =
            db::owner_counts_on(&servers, &present, &t.name, &owner, "NULL::int4").await?;
        for (id, counts) in present.into_iter().zip(everywhere) {
            let mut check = TableCheck {
                table: t.name.clone(),
                shard: p.shards[id].clone(),
                rows: counts.iter().map(|c| c.rows).sum(),
                misplaced: 0,
                belong: Vec::new(),
            };
            for db::OwnerCount {
                old: owner, rows, ..
            } in counts
            {
                if owner != Some(id as i32) {
                    check.misplaced += rows;
                    let shard =
                        owner.map_or("nowhere".to_string(), |o| p.shards[o as usize].clone());
                    check.belong.push((shard, rows));
                }
            }
            report.tables.push(check);
        }
    }
    let home = p
        .shards
        .iter()
        .position(|s| *s == p.default_shard)
        .unwrap_or(0);
    for name in &p.reference {
        let mut expected: Option<(i64, String)> = None;
        for id in std::iter::once(home).chain(all.iter().copied().filter(|&i| i != home)) {
            let c = servers.get(id).await?;
            let Some(cols) = db::columns(&c, name)
                .await
                .on(&servers, id, "reading the catalog")?
            else {
                report.missing.push((name.clone(), p.shards[id].clone()));
                continue;
            };
            let sum = db::checksum(&c, name, &cols, "true").await.on(
                &servers,
                id,
                &format!("checksumming {name}"),
            )?;
            let matches = expected.as_ref().is_none_or(|e| *e == sum);
            expected.get_or_insert(sum.clone());
            report.reference.push(ReferenceCheck {
                table: name.clone(),
                shard: p.shards[id].clone(),
                rows: sum.0,
                checksum: sum.1,
                matches,
            });
        }
    }
    Ok(report)
}
