//! The change tracker: keeps the sources' Services and EndpointSlices and says which services
//! need recomputing, as kube-proxy's `ServiceChangeTracker` and `EndpointsChangeTracker` do.
//! An update that changes nothing (the same object again, a re-list with nothing new) marks
//! nothing, so it costs no map write.

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Service;

use crate::{
    model::{Slice, object_key, slice_service},
    source::{Change, Sourced},
};

/// The kinds a source lists; nothing is deleted before each has had its first complete list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Services,
    Slices,
    Nodes,
}

/// The objects the sources sent, and which services need recomputing.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    services: HashMap<String, Sourced<Service>>,
    slices: HashMap<String, Sourced<Slice>>,
    /// Slice keys by the service (`namespace/name`) their label names, sorted. A list, not a
    /// set: a service has a slice or a few, and a set's first node alone is ~300 bytes
    /// (30 MiB at 100 000 services).
    by_service: HashMap<String, Vec<String>>,
    /// Services to recompute at the next sync.
    dirty: BTreeSet<String>,
    /// Every service is to be recomputed (this node's info changed).
    all_dirty: bool,
    /// Kinds that have had their first complete list.
    listed: [bool; 3],
}

impl Tracker {
    /// Records that `kind` has had a complete list.
    pub(crate) fn listed(&mut self, kind: Kind) {
        self.listed[kind as usize] = true;
    }

    /// Whether every kind has been listed once, so a sync may delete what is gone (a
    /// half-listed cluster must not look like deleted services).
    pub(crate) fn ready(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }

    /// Whether any service waits to be recomputed.
    pub(crate) fn pending(&self) -> bool {
        self.all_dirty || !self.dirty.is_empty()
    }

    /// Marks every service for recomputing (a node change moves what is local, and which
    /// addresses serve nodePorts).
    pub(crate) fn mark_all(&mut self) {
        self.all_dirty = true;
    }

    /// Takes the services to recompute: the marked ones, or after [`Self::mark_all`] every
    /// known service and every one in `programmed` (services deleted since are among those).
    pub(crate) fn take_dirty<'a>(&mut self, programmed: impl Iterator<Item = &'a String>) -> BTreeSet<String> {
        let mut keys = std::mem::take(&mut self.dirty);
        if std::mem::take(&mut self.all_dirty) {
            keys.extend(self.services.keys().cloned());
            keys.extend(programmed.cloned());
        }
        keys
    }

    /// Takes a Services change.
    pub(crate) fn services_changed(&mut self, change: Change<Service>) {
        match change {
            Change::Replace(list) => {
                self.listed(Kind::Services);
                let next: HashMap<String, Sourced<Service>> =
                    list.into_iter().map(|s| (object_key(&s.object.metadata), s)).collect();
                for (key, old) in &self.services {
                    if next.get(key).is_none_or(|new| new.object != old.object) {
                        self.dirty.insert(key.clone());
                    }
                }
                for key in next.keys().filter(|k| !self.services.contains_key(*k)) {
                    self.dirty.insert(key.clone());
                }
                self.services = next;
            }
            Change::Apply(service) => {
                let key = object_key(&service.object.metadata);
                if self.services.get(&key).is_none_or(|old| old.object != service.object) {
                    self.dirty.insert(key.clone());
                    self.services.insert(key, service);
                }
            }
            Change::Delete(key) => {
                if self.services.remove(&key).is_some() {
                    self.dirty.insert(key);
                }
            }
        }
    }

    /// Takes an EndpointSlices change; returns the new slices that name no service (no
    /// `kubernetes.io/service-name` label), for the caller to report.
    pub(crate) fn slices_changed(&mut self, change: Change<Slice>) -> Vec<Sourced<Slice>> {
        let mut unlabelled = Vec::new();
        match change {
            Change::Replace(list) => {
                self.listed(Kind::Slices);
                let next: HashMap<String, Sourced<Slice>> = list.into_iter().map(|s| (s.object.key(), s)).collect();
                let gone: Vec<String> = self.slices.keys().filter(|k| !next.contains_key(*k)).cloned().collect();
                for key in gone {
                    self.remove_slice(&key);
                }
                unlabelled.extend(next.into_values().filter_map(|slice| self.put_slice(slice)));
            }
            Change::Apply(slice) => unlabelled.extend(self.put_slice(slice)),
            Change::Delete(key) => self.remove_slice(&key),
        }
        unlabelled
    }

    /// Stores a slice unless it is unchanged; returns it if it names no service.
    fn put_slice(&mut self, slice: Sourced<Slice>) -> Option<Sourced<Slice>> {
        let key = slice.object.key();
        if self.slices.get(&key).is_some_and(|old| old.object == slice.object) {
            return None;
        }
        self.remove_slice(&key);
        let unlabelled = match slice_service(&slice.object) {
            Some(service) => {
                let keys = self.by_service.entry(service.clone()).or_default();
                if let Err(at) = keys.binary_search(&key) {
                    keys.insert(at, key.clone());
                }
                self.dirty.insert(service);
                None
            }
            None => Some(slice.clone()),
        };
        self.slices.insert(key, slice);
        unlabelled
    }

    fn remove_slice(&mut self, key: &str) {
        let Some(old) = self.slices.remove(key) else { return };
        if let Some(service) = slice_service(&old.object) {
            if let Some(keys) = self.by_service.get_mut(&service) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.by_service.remove(&service);
                }
            }
            self.dirty.insert(service);
        }
    }

    /// A service by `namespace/name`.
    pub(crate) fn service(&self, key: &str) -> Option<&Sourced<Service>> {
        self.services.get(key)
    }

    /// The slices that name service `key`.
    pub(crate) fn slices_of(&self, key: &str) -> Vec<&Slice> {
        let keys = self.by_service.get(key);
        keys.into_iter().flatten().filter_map(|k| self.slices.get(k)).map(|s| &*s.object).collect()
    }
}

#[cfg(test)]
mod tests {
    //! The tracker alone, as kube-proxy's change-tracker tests: which updates mark which
    //! services, and which mark nothing.

    use std::sync::Arc;

    use super::*;
    use crate::sync::testing::{service, slice};

    fn sourced<T>(object: T) -> Sourced<T> {
        Sourced { object: Arc::new(object), origin: None }
    }

    fn dirty(tracker: &mut Tracker) -> Vec<String> {
        tracker.take_dirty(std::iter::empty()).into_iter().collect()
    }

    #[test]
    fn the_same_service_again_marks_nothing() {
        let mut tracker = Tracker::default();
        tracker.services_changed(Change::Apply(sourced(service("web", 10))));
        assert_eq!(dirty(&mut tracker), ["default/web"]);
        tracker.services_changed(Change::Apply(sourced(service("web", 10))));
        assert!(!tracker.pending(), "an unchanged service is no change");
        tracker.services_changed(Change::Replace(vec![sourced(service("web", 10))]));
        assert!(!tracker.pending(), "a re-list with the same service is no change");
    }

    #[test]
    fn a_changed_service_is_marked() {
        let mut tracker = Tracker::default();
        tracker.services_changed(Change::Apply(sourced(service("web", 10))));
        dirty(&mut tracker);
        tracker.services_changed(Change::Apply(sourced(service("web", 11))));
        assert_eq!(dirty(&mut tracker), ["default/web"]);
    }

    #[test]
    fn a_relist_marks_what_came_and_what_went() {
        let mut tracker = Tracker::default();
        tracker.services_changed(Change::Replace(vec![sourced(service("a", 1)), sourced(service("b", 2))]));
        dirty(&mut tracker);
        tracker.services_changed(Change::Replace(vec![sourced(service("b", 2)), sourced(service("c", 3))]));
        assert_eq!(dirty(&mut tracker), ["default/a", "default/c"]);
        assert!(tracker.service("default/a").is_none());
    }

    #[test]
    fn a_slice_marks_the_service_it_names_and_the_same_slice_again_nothing() {
        let mut tracker = Tracker::default();
        tracker.slices_changed(Change::Apply(sourced(slice("web", "a", &[2]))));
        assert_eq!(dirty(&mut tracker), ["default/web"]);
        tracker.slices_changed(Change::Replace(vec![sourced(slice("web", "a", &[2]))]));
        assert!(!tracker.pending(), "an unchanged slice is no change");
        tracker.slices_changed(Change::Delete("default/web-a".into()));
        assert_eq!(dirty(&mut tracker), ["default/web"]);
        assert!(tracker.slices_of("default/web").is_empty());
    }

    #[test]
    fn a_slice_without_the_service_label_is_returned_for_reporting() {
        let mut tracker = Tracker::default();
        let mut unlabelled = slice("web", "a", &[2]);
        unlabelled.service_name = None;
        let reported = tracker.slices_changed(Change::Apply(sourced(unlabelled)));
        assert_eq!(reported.len(), 1);
        assert!(!tracker.pending(), "it names no service to recompute");
    }

    #[test]
    fn ready_only_once_every_kind_is_listed() {
        let mut tracker = Tracker::default();
        tracker.services_changed(Change::Replace(Vec::new()));
        tracker.slices_changed(Change::Apply(sourced(slice("web", "a", &[2]))));
        assert!(!tracker.ready(), "slices were not listed, only applied");
        tracker.slices_changed(Change::Replace(Vec::new()));
        assert!(!tracker.ready(), "nodes were not listed");
        tracker.listed(Kind::Nodes);
        assert!(tracker.ready());
    }

    #[test]
    fn mark_all_takes_every_service_and_every_programmed_one() {
        let mut tracker = Tracker::default();
        tracker.services_changed(Change::Apply(sourced(service("web", 10))));
        dirty(&mut tracker);
        tracker.mark_all();
        let gone = "default/deleted".to_owned();
        let keys: Vec<String> = tracker.take_dirty([&gone].into_iter()).into_iter().collect();
        assert_eq!(keys, ["default/deleted", "default/web"]);
        assert!(!tracker.pending());
    }
}
