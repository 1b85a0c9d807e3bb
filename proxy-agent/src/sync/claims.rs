//! Who owns a contested frontend. Two services can ask for the same address, port and protocol
//! (the same externalIP on two services, say); the maps hold one. The first to be programmed
//! holds it; the others wait as contenders and are recomputed when the holder lets it go.

use std::collections::{BTreeSet, HashMap};

use crate::model::{Frontend, IpFamily};

/// Which service holds each frontend, and which wait for it.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    /// Frontends each service holds, sorted. A slice, not a set: a service holds a frontend or
    /// a few, and a set's first node alone is ~250 bytes (25 MiB at 100 000 services).
    owned: HashMap<String, Box<[Frontend]>>,
    /// The service holding each frontend.
    holder: HashMap<Frontend, String>,
    /// Services that wanted a frontend another service holds.
    contenders: HashMap<Frontend, BTreeSet<String>>,
    /// Frontends held, IPv4 then IPv6 (kept as they change: counting `holder` per sync would
    /// walk every frontend).
    by_family: [usize; 2],
}

impl Claims {
    /// The service other than `key` that holds `frontend`, if any.
    pub(crate) fn held_by_other(&self, frontend: &Frontend, key: &str) -> Option<&str> {
        self.holder.get(frontend).map(String::as_str).filter(|h| *h != key)
    }

    /// The service holding `frontend`, if any.
    pub(crate) fn holder(&self, frontend: &Frontend) -> Option<&str> {
        self.holder.get(frontend).map(String::as_str)
    }

    /// Whether `key` holds `frontend`.
    pub(crate) fn holds(&self, key: &str, frontend: &Frontend) -> bool {
        self.holder.get(frontend).is_some_and(|h| h == key)
    }

    /// Records that `key` waits for `frontend`, held by another service.
    pub(crate) fn contend(&mut self, frontend: Frontend, key: &str) {
        self.contenders.entry(frontend).or_default().insert(key.to_owned());
    }

    /// Takes the frontends `key` holds, to be given back with [`Self::set_owned`] once the
    /// service is reprogrammed.
    pub(crate) fn take_owned(&mut self, key: &str) -> BTreeSet<Frontend> {
        self.owned.remove(key).map(|owned| owned.into_iter().collect()).unwrap_or_default()
    }

    /// Records that `key` holds `frontend`.
    pub(crate) fn claim(&mut self, frontend: Frontend, key: &str) {
        if self.holder.insert(frontend, key.to_owned()).is_none() {
            self.by_family[family_index(&frontend)] += 1;
        }
    }

    /// Records the frontends `key` holds after it was reprogrammed.
    pub(crate) fn set_owned(&mut self, key: &str, owned: BTreeSet<Frontend>) {
        if !owned.is_empty() {
            self.owned.insert(key.to_owned(), owned.into_iter().collect());
        }
    }

    /// Lets `frontend` go; returns the services that waited for it, to recompute.
    pub(crate) fn release(&mut self, frontend: &Frontend) -> BTreeSet<String> {
        if self.holder.remove(frontend).is_some() {
            self.by_family[family_index(frontend)] -= 1;
        }
        self.contenders.remove(frontend).unwrap_or_default()
    }

    /// How many frontends are held, IPv4 then IPv6.
    pub(crate) fn held_by_family(&self) -> [usize; 2] {
        self.by_family
    }

    /// Every service that holds a frontend.
    pub(crate) fn services(&self) -> impl Iterator<Item = &String> {
        self.owned.keys()
    }
}

fn family_index(frontend: &Frontend) -> usize {
    match IpFamily::of(frontend.address) {
        IpFamily::V4 => 0,
        IpFamily::V6 => 1,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn frontend() -> Frontend {
        Frontend { address: Ipv4Addr::new(192, 0, 2, 1).into(), port: 80, proto: proxy_common::proto::TCP }
    }

    #[test]
    fn the_first_claim_holds_and_a_contender_is_handed_the_frontend_on_release() {
        let mut claims = Claims::default();
        claims.claim(frontend(), "default/a");
        claims.set_owned("default/a", [frontend()].into());
        assert_eq!(claims.held_by_other(&frontend(), "default/b"), Some("default/a"));
        assert_eq!(claims.held_by_other(&frontend(), "default/a"), None, "a holds it itself");
        claims.contend(frontend(), "default/b");

        let owned = claims.take_owned("default/a");
        let waiting: BTreeSet<String> = owned.iter().flat_map(|f| claims.release(f)).collect();
        assert_eq!(waiting, BTreeSet::from(["default/b".to_owned()]), "b is to be recomputed");
        assert_eq!(claims.held_by_other(&frontend(), "default/b"), None, "free for b now");
        assert!(claims.release(&frontend()).is_empty(), "the contender is handed over once");
        assert_eq!(claims.services().count(), 0);
    }

    #[test]
    fn held_frontends_are_counted_per_family_once_each() {
        let mut claims = Claims::default();
        let v6 = Frontend { address: "fd00:10:96::a".parse().unwrap(), port: 80, proto: proxy_common::proto::TCP };
        claims.claim(frontend(), "default/a");
        claims.claim(frontend(), "default/a");
        claims.claim(v6, "default/a");
        assert_eq!(claims.held_by_family(), [1, 1], "a frontend claimed twice counts once");
        claims.release(&v6);
        claims.release(&v6);
        assert_eq!(claims.held_by_family(), [1, 0], "a frontend released twice counts once");
    }
}
