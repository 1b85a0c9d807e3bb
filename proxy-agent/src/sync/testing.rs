//! Test fixtures for the sync layer: small object builders and an in-memory [`MapStore`] whose
//! `services` map can be full.

use std::{collections::HashMap, net::Ipv4Addr};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use proxy_common::{
    addr,
    backend::{Backend, BackendId},
    config::NodeConfig,
    conntrack::{CtKey, CtValue},
    maglev::MaglevConfig,
    proto::TCP,
    service::{ServiceKey, ServiceName, ServiceValue},
    sock::{SockRevKey, SockRevValue},
};
use serde_json::json;

use crate::{
    datapath::{
        WriteError,
        writer::{MapStore, recorder::MemMaglev},
    },
    model::{Cidr, Frontend},
};

/// The node the tests' agent runs on.
pub(crate) const NODE: &str = "node-1";

/// Service `default/<name>`: ClusterIP 10.96.0.<last>, port 80/TCP to 8080.
pub(crate) fn service(name: &str, last: u8) -> Service {
    let ip = format!("10.96.0.{last}");
    from_json(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]},
    }))
}

/// The same service with an external IP too.
pub(crate) fn with_external_ip(mut service: Service, ip: Ipv4Addr) -> Service {
    if let Some(spec) = service.spec.as_mut() {
        spec.external_ips = Some(vec![ip.to_string()]);
    }
    service
}

/// Slice `default/<service>-<suffix>` of `service`: ready endpoints 10.244.1.<e> on this node,
/// port 8080/TCP.
pub(crate) fn slice(service: &str, suffix: &str, endpoints: &[u8]) -> EndpointSlice {
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|e| json!({"addresses": [format!("10.244.1.{e}")], "conditions": {"ready": true}, "nodeName": NODE}))
        .collect();
    from_json(json!({
        "metadata": {"name": format!("{service}-{suffix}"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": [{"port": 8080, "protocol": "TCP"}],
    }))
}

/// Node `name` with InternalIP `address`.
pub(crate) fn node(name: &str, address: Ipv4Addr) -> Node {
    from_json(json!({
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": address.to_string()}]},
    }))
}

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

/// The `services` and `backends` maps in memory; `services` holds at most `services_max`
/// entries. Counts every put and delete.
#[derive(Clone, Debug, Default)]
pub(crate) struct MemMaps {
    pub(crate) services: HashMap<ServiceKey, ServiceValue>,
    pub(crate) backends: HashMap<BackendId, Backend>,
    pub(crate) services_max: usize,
    pub(crate) writes: usize,
    /// Maglev tables and seed.
    pub(crate) maglev: MemMaglev,
    /// The node's settings as last written.
    pub(crate) config: Option<NodeConfig>,
}

impl MemMaps {
    /// Empty maps with room for `services_max` `services` entries.
    pub(crate) fn with_room(services_max: usize) -> Self {
        Self { services_max, ..Self::default() }
    }

    /// The backend addresses behind TCP frontend `address:port`, in slot order; `None` if the
    /// frontend has no master entry. A missing or IPv6 backend shows as 0.0.0.0: these
    /// tests are IPv4 ones.
    pub(crate) fn backends_of(&self, address: Ipv4Addr, port: u16) -> Option<Vec<Ipv4Addr>> {
        let master = ServiceKey::master(addr::from_ip(address), port, TCP);
        let value = self.services.get(&master)?;
        let slots = 1..=value.count;
        let ids = slots.map(|slot| self.services.get(&master.with_slot(slot)).map(|v| v.backend_id));
        Some(
            ids.map(|id| {
                id.and_then(|id| self.backends.get(&id)).map_or(Ipv4Addr::UNSPECIFIED, |b| {
                    addr::to_v4(&b.address).map_or(Ipv4Addr::UNSPECIFIED, Ipv4Addr::from)
                })
            })
            .collect(),
        )
    }
}

impl MapStore for MemMaps {
    type Error = WriteError;

    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), WriteError> {
        if !self.services.contains_key(&key) && self.services.len() >= self.services_max {
            // A write into a full map, as the kernel reports it (`E2BIG`).
            return Err(WriteError {
                map: proxy_common::maps::SERVICES,
                max_entries: u32::try_from(self.services_max).ok(),
                source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_elem",
                    io_error: std::io::Error::from_raw_os_error(libc::E2BIG),
                }),
            });
        }
        self.writes += 1;
        self.services.insert(key, value);
        Ok(())
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), WriteError> {
        self.writes += 1;
        self.services.remove(&key);
        Ok(())
    }

    fn put_backend(&mut self, id: BackendId, backend: Backend) -> Result<(), WriteError> {
        self.writes += 1;
        self.backends.insert(id, backend);
        Ok(())
    }

    fn delete_backend(&mut self, id: BackendId) -> Result<(), WriteError> {
        self.writes += 1;
        self.backends.remove(&id);
        Ok(())
    }

    fn put_service_name(&mut self, _: u32, _: ServiceName) -> Result<(), WriteError> {
        Ok(())
    }

    fn delete_service_name(&mut self, _: u32) -> Result<(), WriteError> {
        Ok(())
    }

    fn forget(&mut self, _: &dyn Fn(u32, BackendId) -> bool) -> Result<usize, WriteError> {
        Ok(0)
    }

    fn conntrack_entries(&self) -> Vec<(CtKey, CtValue)> {
        Vec::new()
    }

    fn delete_conntrack(&mut self, _: CtKey) -> Result<(), WriteError> {
        Ok(())
    }

    fn sock_rev_entries(&self) -> Vec<(SockRevKey, SockRevValue)> {
        Vec::new()
    }

    fn delete_sock_rev(&mut self, _: SockRevKey) -> Result<(), WriteError> {
        Ok(())
    }

    fn put_source_range(&mut self, _: &Frontend, _: &Cidr) -> Result<(), WriteError> {
        Ok(())
    }

    fn delete_source_range(&mut self, _: &Frontend, _: &Cidr) -> Result<(), WriteError> {
        Ok(())
    }

    fn put_config(&mut self, config: NodeConfig) -> Result<(), WriteError> {
        self.config = Some(config);
        Ok(())
    }

    fn service_entries(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.services.iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn backend_entries(&self) -> Vec<(BackendId, Backend)> {
        self.backends.iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn service_names(&self) -> Vec<(u32, ServiceName)> {
        Vec::new()
    }

    fn put_maglev_config(&mut self, config: MaglevConfig) -> Result<(), WriteError> {
        self.maglev.config = Some(config);
        Ok(())
    }

    fn put_maglev_table(&mut self, id: u32, slots: &[BackendId]) -> Result<(), WriteError> {
        self.maglev.put(id, slots);
        Ok(())
    }

    fn delete_maglev_table(&mut self, id: u32) -> Result<(), WriteError> {
        self.maglev.tables.remove(&id);
        Ok(())
    }

    fn maglev_tables(&self) -> Vec<u32> {
        self.maglev.tables.keys().copied().collect()
    }

    fn maglev_entry(&self, id: u32, index: u32) -> Option<u32> {
        self.maglev.entry(id, index)
    }
}
