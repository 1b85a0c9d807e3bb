//! Stale entries: affinity, UDP-socket, socket-reverse and UDP-flow entries that keep a client
//! on a backend which left the frontend (or the backend set) it came through. Backends that
//! leave are recorded as they go ([`Writer::forget_departed`] cleans those up after a sync); the
//! periodic check ([`Writer::forget_stale`]) compares every entry with what is programmed.

use std::collections::HashSet;

use proxy_common::{
    addr::{self, Addr},
    backend::BackendId,
    conntrack::CT_F_REPLY,
    proto,
};

use super::{MapStore, Programmed, Writer};
use crate::model::Frontend;

/// What [`Writer::forget_departed`] cleaned up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Departed {
    /// Affinity, UDP-socket and UDP conntrack entries deleted.
    pub entries: usize,
    /// Cookies of sockets the socket path had sent to a departed backend.
    pub sockets: HashSet<u64>,
}

impl<S: MapStore> Writer<S> {
    /// After backends left services: deletes the affinity and UDP-socket entries that still
    /// point at them (a client must not stay stuck to a removed endpoint that another service
    /// still uses), and the socket path's reverse entries of sockets sent to a backend that is
    /// no longer behind that frontend. Returns those sockets' cookies, to be destroyed.
    pub fn forget_departed(&mut self) -> Result<Departed, S::Error> {
        if self.gone.is_empty() {
            return Ok(Departed::default());
        }
        let gone = std::mem::take(&mut self.gone);
        self.forget_where(&|service, backend| gone.contains(&(service, backend)))
    }

    /// The periodic check behind [`Writer::forget_departed`]: deletes every affinity, socket
    /// and UDP flow entry whose backend is not behind its service now, whatever the events
    /// said (entries an earlier agent left, or ones an event was lost for).
    pub fn forget_stale(&mut self) -> Result<Departed, S::Error> {
        self.gone.clear();
        // Every (set, backend) pair programmed: a million at 100 000 × 10, so built only once
        // an affinity or socket entry asks (on a node with clients, every check); sized up
        // front (no rehashing) and hashed with foldhash rather than SipHash.
        let live = std::cell::OnceCell::new();
        let programmed = &self.programmed;
        let live = |service, backend| {
            live.get_or_init(|| {
                let pairs = programmed.values().flat_map(Programmed::sets).map(|(_, set)| set.len()).sum();
                let mut live = hashbrown::HashSet::with_capacity(pairs);
                for (id, set) in programmed.values().flat_map(Programmed::sets) {
                    live.extend(set.iter().map(|b| (id, *b)));
                }
                live
            })
            .contains(&(service, backend))
        };
        let entries = self.store.forget(&|service, backend| !live(service, backend))?;
        self.forget_sockets_and_flows(entries)
    }

    fn forget_where(&mut self, gone: &dyn Fn(u32, BackendId) -> bool) -> Result<Departed, S::Error> {
        let entries = self.store.forget(gone)?;
        self.forget_sockets_and_flows(entries)
    }

    /// After `entries` affinity and socket entries went: deletes the socket reverse entries
    /// and UDP flows whose backend is not behind their frontend now.
    fn forget_sockets_and_flows(&mut self, entries: usize) -> Result<Departed, S::Error> {
        let mut sockets = HashSet::new();
        for (key, frontend) in self.store.sock_rev_entries() {
            // sock_rev does not record the protocol: either frontend will do.
            let live = [proto::TCP, proto::UDP]
                .iter()
                .any(|&p| self.behind(frontend.address, frontend.port, p, key.address, key.port));
            if !live {
                self.store.delete_sock_rev(key)?;
                sockets.insert(key.cookie);
            }
        }
        // UDP flows of the packet path to a backend that left their frontend are flushed, as
        // kube-proxy deletes their conntrack entries: the next datagram picks a live backend.
        // TCP flows are left to finish.
        let mut flows = 0;
        for (key, value) in self.store.conntrack_entries() {
            if key.proto != proto::UDP {
                continue;
            }
            let frontend = if value.flags & CT_F_REPLY != 0 { (value.src, value.sport) } else { (key.dst, key.dport) };
            let backend = self.backend_by_id.get(&value.backend_id).map(|b| (b.address, b.port));
            if !backend.is_some_and(|(address, port)| self.behind(frontend.0, frontend.1, proto::UDP, address, port)) {
                self.store.delete_conntrack(key)?;
                flows += 1;
            }
        }
        Ok(Departed { entries: entries + flows, sockets })
    }

    /// Whether backend (address, port) is behind the programmed frontend (address, port, proto).
    /// Looks at that one frontend only: it runs once per socket or flow entry, after syncs that
    /// removed backends, and must stay cheap however many services there are.
    fn behind(&self, address: Addr, port: u16, proto: u8, backend: Addr, backend_port: u16) -> bool {
        let frontend = Frontend { address: addr::to_ip(&address), port, proto };
        let Some(programmed) = self.programmed.get(&frontend) else { return false };
        programmed
            .external
            .iter()
            .chain(programmed.internal.iter().flatten())
            .filter_map(|id| self.backend_by_id.get(id))
            .any(|b| b.address == backend && b.port == backend_port)
    }

    /// Records the (affinity id, backend) pairs `old` had and `new` no longer has, per backend
    /// set, each under the id its entries carry ([`Programmed::sets`]).
    pub(super) fn departed(&mut self, old: &Programmed, new: Option<&Programmed>) {
        let now = new.map(Programmed::sets);
        for (i, (id, had)) in old.sets().into_iter().enumerate() {
            let has: HashSet<BackendId> = now.map_or(&[][..], |sets| sets[i].1).iter().copied().collect();
            self.gone.extend(had.iter().filter(|b| !has.contains(b)).map(|b| (id, *b)));
        }
    }
}
