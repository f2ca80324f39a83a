//! The slow-statement log (`log.slow_statement`): a unit slower than the
//! bound is logged once when its ReadyForQuery goes to the client, with
//! where it ran and its statements' shapes (constants and comments blanked,
//! as the routing cache keys them: never a parameter or a literal value),
//! and the W3C trace context a statement carried in a sqlcommenter comment.

use super::Session;
use crate::stats::Kind;

/// At most this many bytes of shapes are logged per unit.
const MAX_LOGGED: usize = 2048;

impl Session {
    #[cold]
    pub(super) fn log_slow(&self, us: u64) {
        let mut shapes = String::new();
        let mut shape = String::new();
        for text in self.analysis.routes.texts() {
            shardline_router::cache::shape(text, &mut shape);
            if !shapes.is_empty() {
                shapes.push_str("; ");
            }
            shapes.push_str(shape.trim());
            if shapes.len() > MAX_LOGGED {
                let mut cut = MAX_LOGGED;
                while !shapes.is_char_boundary(cut) {
                    cut -= 1;
                }
                shapes.truncate(cut);
                shapes.push_str("...");
                break;
            }
        }
        let trace = self.unit_trace();
        let shards = &self.shared.topology.shards;
        let several = ("several", "", "");
        let (placement, (shard, role, node)) = match self.meter.placed() {
            Kind::One {
                shard,
                node,
                replica,
            } => {
                let s = shards.get(shard as usize);
                (
                    "one_shard",
                    (
                        s.map_or("", |s| s.name.as_str()),
                        if replica { "replica" } else { "primary" },
                        s.and_then(|s| s.nodes.get(node as usize))
                            .map_or("", |n| n.address.as_str()),
                    ),
                )
            }
            Kind::FanOut => ("fan_out", several),
            Kind::Merge => ("merge", several),
            Kind::Split => ("split", several),
            Kind::Pipeline => ("pipeline", several),
            Kind::None => ("proxy", ("", "", "")),
        };
        tracing::warn!(
            duration_ms = us as f64 / 1000.0,
            user = %self.login.user.name,
            placement,
            shard,
            role,
            node,
            traceparent = trace.as_deref().unwrap_or(""),
            statement = %if shapes.is_empty() { "(not kept: a statement over 4 KiB)" } else { &shapes },
            "slow statement"
        );
    }

    /// The W3C trace context the unit's first traced statement carries in
    /// a sqlcommenter comment, for the log lines about the unit. Looked
    /// for only when a line is written: the data path never scans for it.
    #[cold]
    pub(super) fn unit_trace(&self) -> Option<String> {
        self.analysis
            .routes
            .texts()
            .find_map(|text| shardline_router::hint::traceparent(text).map(str::to_string))
    }
}
