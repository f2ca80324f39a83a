//! A multi-row INSERT whose rows belong to several shards
//! (`Placement::Split`): one statement per shard holding that shard's rows.
//! With bound parameters (SQLAlchemy's insertmanyvalues, PgJDBC's
//! `reWriteBatchedInserts`), each shard's statement references only its own
//! rows' parameters, renumbered from `$1` (the router's `split_insert`), and
//! its Bind carries just those values, each with its format.

use super::Session;
use crate::protocol::backend::{sqlstate, PgError};
use crate::protocol::{frontend, Frame};
use bytes::BytesMut;
use shardline_router::sharding::Sharding;
use shardline_router::shards::{split_insert, Construct};

/// What each shard is sent for a split INSERT.
pub(super) struct SplitUnit {
    /// Per shard, the unit's messages rewritten for its rows.
    pub parts: Vec<(usize, BytesMut)>,
    /// The Parses the client did not send (the Bind named a statement
    /// prepared earlier): shard, and where the Parse ends in its part;
    /// their answers are hidden.
    pub own_ends: Vec<(usize, usize)>,
    /// For each of the INSERT's rows, the part holding it: RETURNING rows
    /// come back in this order.
    pub row_order: Option<Vec<usize>>,
}

impl Session {
    /// Splits the unit's INSERT by shard: a simple query, or the statement
    /// a Bind executes (parsed in this unit, else the session's).
    pub(super) fn split_unit(
        &self,
        frames: &[Frame],
        sh: &Sharding,
        simple: bool,
    ) -> Result<SplitUnit, PgError> {
        let unsupported = |m: &str| self.shared.events.refusals.refuse(Construct::Insert, m);
        let malformed =
            |m: frontend::Malformed| PgError::error(sqlstate::PROTOCOL_VIOLATION, m.to_string());
        let mut statements = super::route::UnitStatements::default();
        let mut parsed_here = false;
        let mut text: Option<Vec<u8>> = None;
        let mut types = frontend::ParamTypes::new();
        let mut rest: &[u8] = &[];
        let mut describes_statement = false;
        for f in frames {
            match f.tag {
                frontend::QUERY => {
                    text = Some(frontend::query(f.body()).map_err(malformed)?.to_vec())
                }
                frontend::PARSE => {
                    let p = frontend::parse(f.body()).map_err(malformed)?;
                    statements.parse(&p, self.route_text(p.query));
                    parsed_here = true;
                }
                frontend::BIND => {
                    let b = frontend::bind(f.body()).map_err(malformed)?;
                    if let Some((_, definition)) = statements.bound(self, b.statement) {
                        text = Some(super::route::definition_query(definition).to_vec());
                        types = frontend::definition_param_types(definition);
                    }
                    rest = b.rest;
                }
                frontend::DESCRIBE => describes_statement |= f.body().first() == Some(&b'S'),
                _ => {}
            }
        }
        let params = frontend::bind_params(rest).unwrap_or_default();
        if !params.is_empty() && describes_statement {
            return Err(unsupported(
                "a multi-row INSERT with parameters whose rows belong to several shards cannot be described as one statement; send its Describe in a unit of its own",
            ));
        }
        let text = text
            .and_then(|t| String::from_utf8(t).ok())
            .ok_or_else(|| unsupported("this INSERT cannot be split by shard"))?;
        let route = self.route_text(text.as_bytes());
        let template = route.shards.as_ref().and_then(|t| t.first());
        let split = split_insert(&text, sh, template, &params, &types)
            .map_err(|r| self.shared.events.refusals.error(r))?;
        let mut unit = SplitUnit {
            parts: Vec::with_capacity(split.len()),
            own_ends: Vec::new(),
            row_order: None,
        };
        let rows: usize = split.iter().map(|p| p.rows.len()).sum();
        let mut order = vec![0; rows];
        for (leg, part) in split.iter().enumerate() {
            for &r in &part.rows {
                if let Some(o) = order.get_mut(r) {
                    *o = leg;
                }
            }
        }
        unit.row_order = Some(order);
        for part in split {
            let mut b = BytesMut::new();
            if simple {
                frontend::write_query(&mut b, &part.sql);
                unit.parts.push((part.shard, b));
                continue;
            }
            // The shard's rows as the unnamed statement, its parameters
            // typed as the client declared them.
            let part_types: Vec<u32> = if types.is_empty() {
                Vec::new()
            } else {
                part.params
                    .iter()
                    .map(|&i| types.get(i).copied().unwrap_or(0))
                    .collect()
            };
            let definition = frontend::definition(&part.sql, &part_types);
            for f in frames {
                match f.tag {
                    frontend::PARSE => frontend::write_parse(&mut b, b"", &definition),
                    frontend::BIND => {
                        if !parsed_here {
                            frontend::write_parse(&mut b, b"", &definition);
                            unit.own_ends.push((part.shard, b.len()));
                        }
                        let rest = frontend::bind(f.body()).map_err(malformed)?.rest;
                        let subset;
                        let rest = if params.is_empty() {
                            rest
                        } else {
                            subset = frontend::bind_rest_subset(rest, &part.params)
                                .ok_or_else(|| malformed(frontend::Malformed("Bind")))?;
                            &subset[..]
                        };
                        frontend::write_bind(&mut b, b"", b"", rest);
                    }
                    frontend::DESCRIBE => {
                        let (kind, _) =
                            frontend::target(f.body(), "Describe").map_err(malformed)?;
                        frontend::write_target(&mut b, frontend::DESCRIBE, kind, b"");
                    }
                    frontend::EXECUTE => {
                        let max_rows = f
                            .body()
                            .last_chunk::<4>()
                            .map_or(0, |n| i32::from_be_bytes(*n));
                        frontend::write_execute(&mut b, b"", max_rows);
                    }
                    _ => b.extend_from_slice(&f.bytes),
                }
            }
            unit.parts.push((part.shard, b));
        }
        Ok(unit)
    }
}
