//! How far the client's extended-protocol unit has reached on the server.
//!
//! A unit runs from its first message to its Sync. While it is open the
//! connection cannot be released (the server would end it at the next
//! client's Sync), and a Flush may split off the part that only prepares
//! statements, before any Bind places it (`client.rs::prepare_only_segment`).

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Unit {
    /// Nothing sent since the last Sync.
    #[default]
    Closed,
    /// Messages sent since the last Sync, none a Bind or Execute: the
    /// unit only prepares so far.
    Preparing,
    /// A Bind or Execute was sent: the unit is placed.
    Bound,
}

impl Unit {
    pub(super) fn is_open(self) -> bool {
        self != Unit::Closed
    }

    /// A Parse, Describe or Close went to the server.
    pub(super) fn prepare(&mut self) {
        if *self == Unit::Closed {
            *self = Unit::Preparing;
        }
    }

    /// A Bind or Execute went to the server.
    pub(super) fn bind(&mut self) {
        *self = Unit::Bound;
    }

    /// The unit ended (its Sync, the proxy's own Sync after a prepare-only
    /// part, or the connection was lost).
    pub(super) fn close(&mut self) {
        *self = Unit::Closed;
    }
}

#[cfg(test)]
mod tests {
    use super::Unit;

    #[test]
    fn a_unit_prepares_then_binds_then_closes() {
        let mut u = Unit::default();
        assert!(!u.is_open());
        u.prepare();
        assert_eq!(u, Unit::Preparing);
        u.bind();
        u.prepare();
        assert_eq!(u, Unit::Bound, "a Parse after a Bind keeps the unit placed");
        assert!(u.is_open());
        u.close();
        assert_eq!(u, Unit::Closed);
        u.prepare();
        assert_eq!(u, Unit::Preparing, "a closed unit forgets its Binds");
    }
}
