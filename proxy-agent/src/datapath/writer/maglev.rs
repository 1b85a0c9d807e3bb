//! Maglev tables: one per backend set that a Maglev frontend uses, keyed by that set's id (the
//! external master's `service_id`, which is `affinity_service_id` of the external scope), so
//! every external frontend of a service port shares one table. A table is rebuilt only when
//! its set of backends changes, and written whole (the store swaps it in with one update)
//! after the backends it names and before backends that left are deleted.

use std::collections::{BTreeSet, HashMap, HashSet};

use proxy_common::{backend::BackendId, maglev::MaglevConfig, service::SVC_F_MAGLEV};
use tracing::warn;

use super::{MapStore, Writer};
use crate::{
    maglev::{self, MaglevSettings},
    model::Frontend,
};

/// One backend set's table, as this writer programmed it.
#[derive(Debug, Default)]
pub(super) struct Table {
    /// The frontends whose traffic from outside uses it.
    users: HashSet<Frontend>,
    /// The set's backend ids, sorted.
    backends: Vec<BackendId>,
    /// Whether the store holds the table for `backends` (a failed write is retried by
    /// [`Writer::restore`]).
    written: bool,
}

/// The Maglev state of a writer.
#[derive(Debug, Default)]
pub(super) struct Tables {
    pub(super) settings: MaglevSettings,
    by_id: HashMap<u32, Table>,
    /// Frontend → the id of the table it uses.
    of: HashMap<Frontend, u32>,
}

impl<S: MapStore> Writer<S> {
    /// Sets the table size and seed, and writes the flow hash's seed for the datapath. Call it
    /// before the first sync: tables are built with the settings in force when written.
    pub fn set_maglev(&mut self, settings: MaglevSettings) -> Result<(), S::Error> {
        self.store.put_maglev_config(MaglevConfig { seed: settings.flow_seed() })?;
        self.maglev.settings = settings;
        Ok(())
    }

    /// The Maglev settings tables are built with.
    pub fn maglev_settings(&self) -> &MaglevSettings {
        &self.maglev.settings
    }

    /// Maglev tables programmed.
    pub fn maglev_tables(&self) -> usize {
        self.maglev.by_id.len()
    }

    /// Brings the Maglev table of `frontend`'s backend set in line with what is programmed
    /// for it (nothing, when it was removed or does not use Maglev).
    pub(super) fn update_maglev(&mut self, frontend: Frontend) {
        let want = self.programmed.get(&frontend).filter(|p| p.master.flags & SVC_F_MAGLEV != 0).and_then(|p| {
            let backends: BTreeSet<BackendId> = p.external.iter().copied().collect();
            (!backends.is_empty()).then(|| (p.master.service_id, backends.into_iter().collect::<Vec<_>>()))
        });
        let old = self.maglev.of.remove(&frontend);
        let new_id = want.as_ref().map(|(id, _)| *id);
        if let Some((id, backends)) = want {
            self.maglev.of.insert(frontend, id);
            let table = self.maglev.by_id.entry(id).or_default();
            table.users.insert(frontend);
            if table.backends != backends || !table.written {
                table.backends = backends;
                self.write_table(id);
            }
        }
        if let Some(old) = old.filter(|old| Some(*old) != new_id) {
            self.release_table(old, frontend);
        }
    }

    /// Builds and writes table `id` from its backends; a failure is logged and retried by the
    /// periodic [`Writer::restore`] (meanwhile new flows of the set are picked at random).
    fn write_table(&mut self, id: u32) {
        let Some(table) = self.maglev.by_id.get_mut(&id) else { return };
        let named: Vec<(BackendId, Vec<u8>)> = table
            .backends
            .iter()
            .filter_map(|b| {
                self.backend_by_id.get(b).map(|backend| (*b, maglev::backend_name(backend.address, backend.port)))
            })
            .collect();
        let settings = &self.maglev.settings;
        let slots = maglev::build(&named, settings.table_size, &settings.seed);
        match self.store.put_maglev_table(id, &slots) {
            Ok(()) => table.written = true,
            Err(error) => {
                table.written = false;
                warn!(
                    table = id,
                    error = %crate::error_chain(&error),
                    "cannot write a Maglev table (map maglev); new flows of this backend set are picked at random \
                     until it is written - raise --services-map-size if the map is full"
                );
            }
        }
    }

    /// Drops `frontend`'s use of table `id`; the table goes with its last user.
    fn release_table(&mut self, id: u32, frontend: Frontend) {
        let Some(table) = self.maglev.by_id.get_mut(&id) else { return };
        table.users.remove(&frontend);
        if table.users.is_empty() {
            self.maglev.by_id.remove(&id);
            if let Err(error) = self.store.delete_maglev_table(id) {
                warn!(table = id, error = %crate::error_chain(&error), "cannot delete a Maglev table; the next periodic check retries");
            }
        }
    }

    /// Deletes tables nobody programmed (an earlier agent's) and rewrites those missing or not
    /// written. Only the table ids are compared: reading every slot of every table each period
    /// would cost 4·M bytes a table.
    pub(super) fn restore_maglev(&mut self) -> Result<(), S::Error> {
        let present: HashSet<u32> = self.store.maglev_tables().into_iter().collect();
        let missing: Vec<u32> =
            self.maglev.by_id.iter().filter(|(id, t)| !t.written || !present.contains(id)).map(|(id, _)| *id).collect();
        for id in missing {
            self.write_table(id);
        }
        self.sweep_maglev(present)
    }

    /// Deletes the tables among `present` that this writer did not program.
    pub(super) fn sweep_maglev(&mut self, present: HashSet<u32>) -> Result<(), S::Error> {
        for id in present.into_iter().filter(|id| !self.maglev.by_id.contains_key(id)) {
            self.store.delete_maglev_table(id)?;
        }
        Ok(())
    }
}
