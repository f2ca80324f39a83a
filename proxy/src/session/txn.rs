//! What the proxy holds of the client's transaction.
//!
//! Whether a transaction is open on the attached server is that
//! connection's own `tx_status`. The proxy adds two things the server does
//! not know: a BEGIN it answered and has not sent yet, and a failure of its
//! own making (a statement it refused). `Txn` is those, as one value.

use bytes::Bytes;

#[derive(Debug, Clone, Default, PartialEq)]
pub(super) enum Txn {
    /// Nothing held: the server's status is the client's.
    #[default]
    Plain,
    /// A BEGIN answered by the proxy and not sent yet: the client's own,
    /// deferred until its transaction's first statement that runs, or the
    /// BEGIN a shard joining the transaction gets (at its isolation level).
    Begin(Bytes),
    /// Failed by the proxy (a refused statement, a shard that could not
    /// join), as Postgres fails a transaction after an error: everything
    /// but its end gets 25P02, and COMMIT rolls back. `unsent`: the BEGIN
    /// still held, when the transaction failed before it was sent.
    Failed { unsent: Option<Bytes> },
}

impl Txn {
    /// The BEGIN held, failed or not.
    pub(super) fn begin(&self) -> Option<&Bytes> {
        match self {
            Txn::Begin(b) | Txn::Failed { unsent: Some(b) } => Some(b),
            _ => None,
        }
    }

    pub(super) fn has_begin(&self) -> bool {
        self.begin().is_some()
    }

    pub(super) fn failed(&self) -> bool {
        matches!(self, Txn::Failed { .. })
    }

    /// Holds `begin` to be sent (kept through a failure).
    pub(super) fn set_begin(&mut self, begin: Bytes) {
        *self = match self {
            Txn::Failed { .. } => Txn::Failed {
                unsent: Some(begin),
            },
            _ => Txn::Begin(begin),
        };
    }

    /// The BEGIN held, to be sent now.
    pub(super) fn take_begin(&mut self) -> Option<Bytes> {
        match std::mem::take(self) {
            Txn::Begin(b) => Some(b),
            Txn::Failed { unsent } => {
                *self = Txn::Failed { unsent: None };
                unsent
            }
            Txn::Plain => None,
        }
    }

    /// The proxy fails the transaction (a held BEGIN stays held).
    pub(super) fn fail(&mut self) {
        if let Txn::Plain | Txn::Begin(_) = self {
            *self = Txn::Failed {
                unsent: self.take_begin(),
            };
        }
    }

    /// The failure is over (ROLLBACK TO SAVEPOINT, or the server's ROLLBACK
    /// done); a BEGIN still held stays held.
    pub(super) fn recover(&mut self) {
        if let Txn::Failed { unsent } = self {
            *self = match unsent.take() {
                Some(b) => Txn::Begin(b),
                None => Txn::Plain,
            };
        }
    }

    /// The transaction status the client is told, given the server's: in
    /// its transaction while the BEGIN is held, failed after the proxy
    /// failed it (the server's transaction is still fine).
    pub(super) fn client_status(&self, server: u8) -> u8 {
        match (server, self) {
            (b'I', Txn::Failed { unsent: Some(_) }) => b'E',
            (b'I', Txn::Begin(_)) => b'T',
            (b'T', Txn::Failed { .. }) => b'E',
            (other, _) => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Txn;
    use bytes::Bytes;

    fn begin() -> Bytes {
        Bytes::from_static(b"Q\0\0\0\x0aBEGIN\0")
    }

    #[test]
    fn a_failure_keeps_the_held_begin_and_recovering_gives_it_back() {
        let mut t = Txn::Plain;
        t.set_begin(begin());
        assert_eq!((t.has_begin(), t.failed()), (true, false));
        t.fail();
        assert_eq!(
            t,
            Txn::Failed {
                unsent: Some(begin())
            }
        );
        t.fail();
        assert_eq!(
            t,
            Txn::Failed {
                unsent: Some(begin())
            }
        );
        t.recover();
        assert_eq!(t, Txn::Begin(begin()));
        assert_eq!(t.take_begin(), Some(begin()));
        assert_eq!(t, Txn::Plain);
        t.fail();
        assert_eq!(t, Txn::Failed { unsent: None });
        t.set_begin(begin());
        assert_eq!(t.take_begin(), Some(begin()));
        assert_eq!(t, Txn::Failed { unsent: None });
        t.recover();
        assert_eq!(t, Txn::Plain);
        t.recover();
        assert_eq!(t, Txn::Plain);
    }

    #[test]
    fn the_client_is_told_the_transaction_it_is_in() {
        let failed = Txn::Failed { unsent: None };
        let unsent = Txn::Failed {
            unsent: Some(begin()),
        };
        let cases = [
            (Txn::Plain, b'I', b'I'),
            (Txn::Plain, b'T', b'T'),
            (Txn::Plain, b'E', b'E'),
            (Txn::Begin(begin()), b'I', b'T'),
            (Txn::Begin(begin()), b'T', b'T'),
            (failed.clone(), b'T', b'E'),
            (failed.clone(), b'I', b'I'),
            (failed, b'E', b'E'),
            (unsent.clone(), b'I', b'E'),
            (unsent, b'T', b'E'),
        ];
        for (txn, server, client) in cases {
            assert_eq!(
                txn.client_status(server),
                client,
                "{txn:?} {}",
                server as char
            );
        }
    }
}
