//! Batched writes for large syncs: while a batch is open, the puts of new frontends are staged
//! instead of written, then written a stage at a time, one map update batch each (a full sync of
//! 10 000 services × 10 endpoints is ~210 000 entries, one `bpf()` call each otherwise).
//!
//! The stages keep [`super::Writer::upsert`]'s order across the whole batch: every backend,
//! then every service name, then every slot, then the masters (a frontend's internal-scope
//! master before its external one), and only then the Maglev tables, which name backends. A
//! lookup racing the batch therefore finds either no master or a master over written slots.
//!
//! Staged writes go out every thousand frontends (and before anything that is not staged),
//! so the order holds within each chunk and a chunk is whole before the next starts.
//!
//! A stage that fails (a full map) is undone, with the stage before it when both fill the same
//! map (slots and masters), and redone entry by entry, frontend by frontend, from there on:
//! the frontend whose write fails is removed again and reported, the others are programmed, as
//! one write at a time would have left them. (Undone first, so the entries of frontends later
//! in the batch do not take the room of earlier ones.)
//!
//! After a restart every frontend is new to the writer, but an earlier agent's entries serve
//! it: entries already holding the value are not staged (nor undone), backends and names
//! under their adopted ids are not written, and an undo puts back the value an entry held
//! before the batch instead of deleting it, so an undo never takes away what served traffic.

use std::collections::HashMap;

use proxy_common::{
    backend::{Backend, BackendId},
    service::{SCOPE_INTERNAL, ServiceKey, ServiceName, ServiceValue},
};

use super::{MapStore, Writer, ids::service_name, master_key};
use crate::model::Frontend;

/// Frontends staged before their writes go out: enough that a stage costs a handful of system
/// calls per thousand frontends, few enough that the staged entries (and their copies for the
/// kernel) stay a few MiB whatever the sync's size.
const CHUNK: usize = 1024;

/// What an open batch has staged.
#[derive(Debug, Default)]
pub(super) struct Staged {
    /// Frontends whose writes are staged, in upsert order.
    frontends: Vec<Frontend>,
    backends: Vec<(BackendId, Backend)>,
    names: Vec<(u32, ServiceName)>,
    slots: Vec<(ServiceKey, ServiceValue)>,
    masters: Vec<(ServiceKey, ServiceValue)>,
    /// The values an earlier agent's entries held before the batch replaced them, for the
    /// undo.
    previous: HashMap<ServiceKey, ServiceValue>,
}

impl Staged {
    /// Stages `services` entry `key` → `value` into `stage` (slots or masters) unless an
    /// earlier agent's entry (`adopted`, sorted) holds that value already; returns whether it
    /// was staged.
    fn put(
        &mut self,
        masters: bool,
        key: ServiceKey,
        value: ServiceValue,
        adopted: &[(ServiceKey, ServiceValue)],
    ) -> bool {
        if let Ok(i) = adopted.binary_search_by_key(&key, |(k, _)| *k) {
            if adopted[i].1 == value {
                return false;
            }
            self.previous.insert(key, adopted[i].1);
        }
        let stage = if masters { &mut self.masters } else { &mut self.slots };
        stage.push((key, value));
        true
    }
}

/// The stages of a flush, in the order they are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Backends,
    Names,
    Slots,
    Masters,
}

/// A frontend a batch could not program, and the write that failed.
pub type Refusal<E> = (Frontend, E);

impl<S: MapStore> Writer<S> {
    /// Opens a batch: from now on, the writes of frontends that are not programmed yet are
    /// staged until [`Writer::end_batch`]. Anything else (a changed or removed frontend, the
    /// sweep, the periodic check) writes what is staged first, so it never overtakes it.
    pub fn begin_batch(&mut self) {
        self.staged.get_or_insert_with(Staged::default);
    }

    /// Writes what the batch staged and closes it. Returns the frontends that did not fit
    /// (already removed again, as a failed [`Writer::upsert`] removes its frontend); the caller
    /// refuses their services.
    pub fn end_batch(&mut self) -> Vec<Refusal<S::Error>> {
        self.settle();
        self.staged = None;
        std::mem::take(&mut self.refused)
    }

    /// Whether a batch is open: an upsert's success says only that its writes are staged.
    pub fn batching(&self) -> bool {
        self.staged.is_some()
    }

    /// Whether `upsert` of `frontend` may be staged: a batch is open and the frontend is new
    /// (a change also deletes, and deletes are never staged).
    pub(super) fn stages(&self, frontend: &Frontend) -> bool {
        self.staged.is_some() && !self.programmed.contains_key(frontend)
    }

    /// Stages what `write` would have written for the new frontend `frontend`, already in
    /// `programmed` (its source ranges are written directly); `new_backends` are the backend
    /// ids it took first, `new_name` whether its service port is new, `adopted` the entries an
    /// earlier agent left for it. Returns how many `services` entries it staged.
    pub(super) fn stage(
        &mut self,
        frontend: Frontend,
        new_backends: Vec<BackendId>,
        new_name: bool,
        mut adopted: Vec<(ServiceKey, ServiceValue)>,
    ) -> usize {
        let (Some(staged), Some(p)) = (&mut self.staged, self.programmed.get(&frontend)) else { return 0 };
        adopted.sort_unstable_by_key(|(key, _)| *key);
        let key = master_key(&frontend);
        staged.frontends.push(frontend);
        staged.backends.extend(new_backends.into_iter().filter_map(|id| self.backend_by_id.get(&id).map(|b| (id, *b))));
        if new_name && let Some((id, _)) = self.services.ids.get(&p.service) {
            staged.names.push((*id, service_name(&p.service)));
        }
        let mut count = 0;
        for (scope, ids) in [(key.with_scope(SCOPE_INTERNAL), p.internal.as_deref()), (key, Some(&p.external[..]))] {
            for (i, &id) in ids.unwrap_or_default().iter().enumerate() {
                count += usize::from(staged.put(false, scope.with_slot(i as u16 + 1), slot_value(id), &adopted));
            }
        }
        if let Some(internal) = p.internal_master() {
            count += usize::from(staged.put(true, key.with_scope(SCOPE_INTERNAL), internal, &adopted));
        }
        count += usize::from(staged.put(true, key, p.master, &adopted));
        if staged.frontends.len() >= CHUNK {
            self.settle();
        }
        count
    }

    /// Writes what is staged (keeping the batch open); refusals are kept for `end_batch`.
    pub(super) fn settle(&mut self) {
        let Some(staged) = self.staged.as_mut().map(std::mem::take) else { return };
        if staged.frontends.is_empty() {
            return;
        }
        let failed = self.flush(&staged);
        if let Some(failed) = failed {
            let stage = self.undo(&staged, failed);
            for frontend in &staged.frontends {
                if let Err(error) = self.write_one(frontend, stage) {
                    self.refused.push((*frontend, error));
                    // Removes what it wrote, drops its references; a failing delete leaves an
                    // entry the next sweep or periodic check removes.
                    let _ = self.remove_now(*frontend);
                }
            }
        }
        for frontend in &staged.frontends {
            self.update_maglev(*frontend);
        }
    }

    /// Writes the stages in order; the first that fails, if any.
    fn flush(&mut self, staged: &Staged) -> Option<Stage> {
        let store = &mut self.store;
        if store.put_backends(&staged.backends).is_err() {
            return Some(Stage::Backends);
        }
        if store.put_service_names(&staged.names).is_err() {
            return Some(Stage::Names);
        }
        if store.put_services(&staged.slots).is_err() {
            return Some(Stage::Slots);
        }
        store.put_services(&staged.masters).is_err().then_some(Stage::Masters)
    }

    /// Deletes what the `failed` stage may have written, and the slots when the masters failed
    /// (both in `services`), putting back instead what an earlier agent's entries held; returns
    /// the stage to redo from. Best effort: a failing delete leaves an entry the next sweep or
    /// periodic check removes. (Backends and names are only ever staged under fresh ids: none
    /// of them was there before.)
    fn undo(&mut self, staged: &Staged, failed: Stage) -> Stage {
        let store = &mut self.store;
        match failed {
            Stage::Backends => {
                staged.backends.iter().for_each(|(id, _)| drop(store.delete_backend(*id)));
                Stage::Backends
            }
            Stage::Names => {
                staged.names.iter().for_each(|(id, _)| drop(store.delete_service_name(*id)));
                Stage::Names
            }
            Stage::Slots | Stage::Masters => {
                // Masters before slots, and a frontend's external master before its
                // internal-scope one: the reverse of their write order. A master put back
                // counts only the slots it had, which were there before the batch too.
                for (key, _) in staged.masters.iter().rev().chain(&staged.slots) {
                    drop(match staged.previous.get(key) {
                        Some(value) => store.put_service(*key, *value),
                        None => store.delete_service(*key),
                    });
                }
                Stage::Slots
            }
        }
    }

    /// Writes `frontend`'s entries of stage `from` and later, one at a time (rewriting an
    /// entry the failed batch already wrote is harmless).
    fn write_one(&mut self, frontend: &Frontend, from: Stage) -> Result<(), S::Error> {
        let Some(p) = self.programmed.get(frontend) else { return Ok(()) };
        let key = master_key(frontend);
        let scopes = [(key.with_scope(SCOPE_INTERNAL), p.internal.as_deref()), (key, Some(&p.external[..]))];
        if from <= Stage::Backends {
            for id in scopes.iter().flat_map(|(_, ids)| ids.unwrap_or_default()) {
                if let Some(backend) = self.backend_by_id.get(id) {
                    self.store.put_backend(*id, *backend)?;
                }
            }
        }
        if from <= Stage::Names
            && let Some((id, _)) = self.services.ids.get(&p.service)
        {
            self.store.put_service_name(*id, service_name(&p.service))?;
        }
        if from <= Stage::Slots {
            for (scope, ids) in scopes {
                for (i, &id) in ids.unwrap_or_default().iter().enumerate() {
                    self.store.put_service(scope.with_slot(i as u16 + 1), slot_value(id))?;
                }
            }
        }
        if let Some(internal) = p.internal_master() {
            self.store.put_service(key.with_scope(SCOPE_INTERNAL), internal)?;
        }
        self.store.put_service(key, p.master)
    }
}

/// The `services` value of a slot naming backend `id`.
fn slot_value(id: BackendId) -> ServiceValue {
    ServiceValue { backend_id: id, ..ServiceValue::default() }
}
