//! What a leg is sent: the client's messages for that shard's
//! connection, named statements under their server names.

use crate::protocol::frontend;
use crate::session::leg::{parse_on, Leg, Parsed};
use crate::session::{End, Session};
use bytes::BytesMut;

impl Session {
    /// Writes the unit's client frames for one shard's connection: named
    /// statements under their server names, prepared there when missing.
    pub(in crate::session) fn translate(
        &mut self,
        frames: &[crate::protocol::Frame],
        leg: &mut Leg,
        out: &mut BytesMut,
    ) -> Result<(), End> {
        for f in frames {
            match f.tag {
                frontend::PARSE => {
                    let parsed = self.record_parse(f)?;
                    parse_on(leg, &parsed, f, out);
                }
                frontend::BIND => {
                    let b = frontend::bind(f.body())?;
                    if b.statement.is_empty() {
                        self.unnamed_on(leg, out);
                        out.extend_from_slice(&f.bytes);
                        continue;
                    }
                    let Some(stmt) = self.statements.get(b.statement).cloned() else {
                        // Unknown: the server reports it, as it would.
                        out.extend_from_slice(&f.bytes);
                        continue;
                    };
                    crate::session::rename::ensure(leg, out, &stmt);
                    frontend::write_bind(out, b.portal, &stmt.server_name, b.rest);
                }
                frontend::DESCRIBE => {
                    let (kind, name) = frontend::target(f.body(), "Describe")?;
                    match (kind, self.statements.get(name).cloned()) {
                        (b'S', Some(stmt)) if !name.is_empty() => {
                            crate::session::rename::ensure(leg, out, &stmt);
                            frontend::write_target(
                                out,
                                frontend::DESCRIBE,
                                b'S',
                                &stmt.server_name,
                            );
                        }
                        (b'S', _) if name.is_empty() => {
                            self.unnamed_on(leg, out);
                            out.extend_from_slice(&f.bytes);
                        }
                        _ => out.extend_from_slice(&f.bytes),
                    }
                }
                frontend::CLOSE => self.close_on_shard(f, out)?,
                _ => out.extend_from_slice(&f.bytes),
            }
        }
        Ok(())
    }

    /// A client's Close on a shard's connection: a named statement is
    /// forgotten by the client only (server statements stay for other
    /// clients), answered alike by closing a name never prepared.
    pub(in crate::session) fn close_on_shard(
        &mut self,
        f: &crate::protocol::Frame,
        out: &mut BytesMut,
    ) -> Result<(), End> {
        let (kind, name) = frontend::target(f.body(), "Close")?;
        if kind == b'S' && !name.is_empty() {
            self.statements.remove(name);
            frontend::write_target(out, frontend::CLOSE, b'S', b"_sl_never_prepared");
        } else {
            out.extend_from_slice(&f.bytes);
        }
        Ok(())
    }

    /// Records a client's Parse as its statement (unnamed, or named under
    /// the process-wide server name).
    pub(in crate::session) fn record_parse(
        &mut self,
        f: &crate::protocol::Frame,
    ) -> Result<Parsed, End> {
        let p = frontend::parse(f.body())?;
        let route = self.route_text(p.query);
        let effect = crate::session::route::parse_effect(&route, p.query);
        if p.name.is_empty() {
            let token = self.remember_unnamed(f, p.definition.len(), effect, route);
            return Ok(Parsed::Unnamed(token));
        }
        let stmt = self.shared.statements.intern(p.definition, effect, route);
        self.statements.insert(p.name.into(), stmt.clone());
        Ok(Parsed::Named(stmt))
    }

    pub(super) fn unnamed_on(&self, leg: &mut Leg, out: &mut BytesMut) {
        if let Some(u) = &self.unnamed {
            crate::session::rename::ensure_unnamed(leg, out, u.token, &u.definition);
        }
    }
}
