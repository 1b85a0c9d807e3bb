//! A trace event → one line: what happened in words, the filters, and the two output formats.
//! Pure: the names of services and network namespaces come in through [`Names`].

use std::net::{IpAddr, SocketAddr};

use proxy_common::{
    addr::{self, Addr},
    drop,
    service::{SCOPE_INTERNAL, SERVICE_ID_LOCAL_SET},
    trace::{NOT_DROPPED, PATH_SOCKET, PICK_AFFINITY, PICK_MAGLEV, PICK_RANDOM, TraceEvent},
};
use serde::Serialize;

use crate::model::proto_name;

/// What a line needs besides the event: names of service ports and network namespaces.
pub trait Names {
    /// `namespace/name[:port]` of the service port with this id (without its local-set bit).
    fn service(&mut self, service_id: u32) -> Option<String>;
    /// The service port id of the frontend (address, port, proto), for a drop (whose event
    /// carries no id).
    fn frontend_service(&mut self, address: Addr, port: u16, proto: u8) -> Option<u32>;
    /// The name of the network namespace with this cookie (`/run/netns/<name>`, or `self`).
    fn netns(&mut self, cookie: u64) -> Option<String>;
    /// Whether the namespace with this cookie has `address` on an interface.
    fn netns_has(&mut self, cookie: u64, address: IpAddr) -> bool;
}

/// One line of `trace` output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Line {
    /// Wall-clock time, RFC 3339 with milliseconds.
    pub time: String,
    /// `socket` or `tc`.
    pub path: &'static str,
    /// TC: the client's `address:port`. Socket path: `netns <name>` or `netns cookie <n>`.
    pub client: String,
    /// Socket path: the client socket's network namespace cookie.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
    /// The frontend addressed, `address:port/PROTO`.
    pub frontend: String,
    /// The service port, `namespace/name[:port]`, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The chosen backend, `address:port/PROTO`; absent for a drop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Why this backend: `random`, `affinity` or `maglev`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pick: Option<&'static str>,
    /// The slot picked at random, or the Maglev table slot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<u16>,
    /// The backend set picked from: `cluster` (every ready endpoint) or `local` (this node's
    /// only, a traffic policy of Local).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<&'static str>,
    /// `internal` when the frontend has a set for the node's own traffic and that was used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<&'static str>,
    /// TC: the `address:port` the flow is SNATed to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat: Option<String>,
    /// The drop or refusal reason (`proxy_common::drop` names, as `inspect drops` shows).
    #[serde(rename = "drop", skip_serializing_if = "Option::is_none")]
    pub dropped: Option<&'static str>,
}

/// The `--service` and `--from` filters.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// `namespace/name` (any port) or `namespace/name:port`.
    pub service: Option<String>,
    /// The client's address (TC), or an address of the client's network namespace (socket).
    pub from: Option<IpAddr>,
}

impl Filter {
    /// Whether `line`, made from `event`, passes.
    pub fn admits(&self, event: &TraceEvent, line: &Line, names: &mut dyn Names) -> bool {
        if let Some(wanted) = &self.service {
            let Some(service) = &line.service else { return false };
            let any_port = service.split_once(':').map_or(service.as_str(), |(name, _)| name);
            if service != wanted && any_port != wanted {
                return false;
            }
        }
        if let Some(from) = self.from {
            let admitted = if event.path == PATH_SOCKET {
                names.netns_has(event.netns_cookie, from)
            } else {
                addr::to_ip(&event.client) == from
            };
            if !admitted {
                return false;
            }
        }
        true
    }
}

/// The line for `event`, stamped `time`.
pub fn line(event: &TraceEvent, time: String, names: &mut dyn Names) -> Line {
    let socket = event.path == PATH_SOCKET;
    let proto = proto_name(event.proto);
    let dropped = event.drop_reason != NOT_DROPPED;
    let client = if socket {
        names
            .netns(event.netns_cookie)
            .map_or_else(|| format!("netns cookie {}", event.netns_cookie), |n| format!("netns {n}"))
    } else {
        SocketAddr::new(addr::to_ip(&event.client), event.client_port).to_string()
    };
    let service_id = if dropped {
        names.frontend_service(event.frontend, event.frontend_port, event.proto)
    } else {
        Some(event.service_id)
    };
    Line {
        time,
        path: if socket { "socket" } else { "tc" },
        client,
        netns_cookie: socket.then_some(event.netns_cookie),
        frontend: format!("{}/{proto}", SocketAddr::new(addr::to_ip(&event.frontend), event.frontend_port)),
        service: service_id.and_then(|id| names.service(id & !SERVICE_ID_LOCAL_SET)),
        backend: kept(
            !dropped,
            format!("{}/{proto}", SocketAddr::new(addr::to_ip(&event.backend), event.backend_port)),
        ),
        pick: kept(
            !dropped,
            match event.pick {
                PICK_RANDOM => "random",
                PICK_AFFINITY => "affinity",
                PICK_MAGLEV => "maglev",
                _ => "unknown",
            },
        ),
        slot: kept(!dropped, event.slot).filter(|_| event.pick == PICK_RANDOM || event.pick == PICK_MAGLEV),
        endpoints: kept(!dropped, if event.service_id & SERVICE_ID_LOCAL_SET != 0 { "local" } else { "cluster" }),
        scope: kept(!dropped, "internal").filter(|_| event.scope == SCOPE_INTERNAL),
        snat: (event.snat != addr::UNSPECIFIED)
            .then(|| SocketAddr::new(addr::to_ip(&event.snat), event.snat_port).to_string()),
        dropped: dropped.then(|| drop::name(event.drop_reason)),
    }
}

/// `value` when `keep` (a translation's fields, absent from a drop's line).
fn kept<T>(keep: bool, value: T) -> Option<T> {
    keep.then_some(value)
}

/// The line for people: time, path, client → frontend (service) → backend or drop, and why.
pub fn table_line(line: &Line) -> String {
    let service = line.service.as_deref().map(|s| format!(" ({s})")).unwrap_or_default();
    let mut text = format!("{} {:<6} {} -> {}{service}", line.time, line.path, line.client, line.frontend);
    if let Some(reason) = line.dropped {
        text.push_str(&format!(" DROPPED {reason}"));
        return text;
    }
    if let Some(backend) = &line.backend {
        text.push_str(&format!(" => {backend}"));
    }
    let mut why = vec![match (line.pick, line.slot) {
        (Some(pick), Some(slot)) => format!("{pick} slot {slot}"),
        (Some(pick), None) => pick.to_owned(),
        (None, _) => String::new(),
    }];
    if let Some(endpoints) = line.endpoints {
        why.push(format!("{endpoints} endpoints"));
    }
    if let Some(scope) = line.scope {
        why.push(format!("{scope} scope"));
    }
    text.push_str(&format!(" [{}]", why.join(", ")));
    if let Some(snat) = &line.snat {
        text.push_str(&format!(" snat {snat}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proxy_common::{proto::TCP, trace::PATH_TC};

    use super::*;

    #[derive(Default)]
    struct Fixed {
        services: BTreeMap<u32, String>,
        frontends: BTreeMap<(Addr, u16), u32>,
        netns: BTreeMap<u64, (String, IpAddr)>,
    }

    impl Names for Fixed {
        fn service(&mut self, id: u32) -> Option<String> {
            self.services.get(&id).cloned()
        }
        fn frontend_service(&mut self, address: Addr, port: u16, _proto: u8) -> Option<u32> {
            self.frontends.get(&(address, port)).copied()
        }
        fn netns(&mut self, cookie: u64) -> Option<String> {
            self.netns.get(&cookie).map(|(name, _)| name.clone())
        }
        fn netns_has(&mut self, cookie: u64, address: IpAddr) -> bool {
            self.netns.get(&cookie).is_some_and(|(_, a)| *a == address)
        }
    }

    fn names() -> Fixed {
        Fixed {
            services: [(7, "default/web:http".to_owned())].into(),
            frontends: [((addr::from_v4([10, 96, 0, 10]), 80), 7)].into(),
            netns: [(42, ("client".to_owned(), IpAddr::from([10, 244, 0, 5])))].into(),
        }
    }

    fn socket_pick() -> TraceEvent {
        TraceEvent {
            path: PATH_SOCKET,
            proto: TCP,
            netns_cookie: 42,
            frontend: addr::from_v4([10, 96, 0, 10]),
            frontend_port: 80,
            backend: addr::from_v4([10, 244, 1, 2]),
            backend_port: 8080,
            service_id: 7 | SERVICE_ID_LOCAL_SET,
            backend_id: 3,
            pick: PICK_RANDOM,
            slot: 2,
            drop_reason: NOT_DROPPED,
            ..TraceEvent::default()
        }
    }

    #[test]
    fn a_socket_pick_names_the_namespace_service_backend_and_why() {
        let line = line(&socket_pick(), "t".into(), &mut names());
        assert_eq!(line.path, "socket");
        assert_eq!(line.client, "netns client");
        assert_eq!(line.service.as_deref(), Some("default/web:http"));
        assert_eq!(line.backend.as_deref(), Some("10.244.1.2:8080/TCP"));
        assert_eq!((line.pick, line.slot, line.endpoints), (Some("random"), Some(2), Some("local")));
        assert_eq!((&line.snat, line.dropped), (&None, None));
        assert_eq!(
            table_line(&line),
            "t socket netns client -> 10.96.0.10:80/TCP (default/web:http) => 10.244.1.2:8080/TCP [random slot 2, local endpoints]"
        );
    }

    #[test]
    fn a_maglev_pick_is_named_with_its_table_slot() {
        let event = TraceEvent { path: PATH_TC, pick: PICK_MAGLEV, slot: 12_345, ..socket_pick() };
        let line = line(&event, "t".into(), &mut names());
        assert_eq!((line.pick, line.slot), (Some("maglev"), Some(12_345)));
        assert!(table_line(&line).contains("[maglev slot 12345, "), "{}", table_line(&line));
    }

    #[test]
    fn a_tc_drop_finds_its_service_from_the_frontend() {
        let event = TraceEvent {
            path: PATH_TC,
            proto: TCP,
            client: addr::from_v4([192, 0, 2, 1]),
            client_port: 40000,
            frontend: addr::from_v4([10, 96, 0, 10]),
            frontend_port: 80,
            drop_reason: drop::SOURCE_RANGE_DENIED,
            ..TraceEvent::default()
        };
        let line = line(&event, "t".into(), &mut names());
        assert_eq!((line.client.as_str(), line.service.as_deref()), ("192.0.2.1:40000", Some("default/web:http")));
        assert_eq!((line.dropped, &line.backend, line.pick), (Some("source_range_denied"), &None, None));
        let json = serde_json::to_value(&line).unwrap();
        assert_eq!(json["drop"], "source_range_denied");
        assert!(json.get("backend").is_none());
    }

    #[test]
    fn filters_match_the_service_with_or_without_port_and_the_client() {
        let event = socket_pick();
        let line = line(&event, "t".into(), &mut names());
        let admits = |service: Option<&str>, from: Option<[u8; 4]>| {
            let filter = Filter { service: service.map(str::to_owned), from: from.map(IpAddr::from) };
            filter.admits(&event, &line, &mut names())
        };
        assert!(admits(Some("default/web"), None));
        assert!(admits(Some("default/web:http"), None));
        assert!(!admits(Some("default/other"), None));
        assert!(admits(None, Some([10, 244, 0, 5])));
        assert!(!admits(None, Some([10, 244, 0, 6])));
    }
}
