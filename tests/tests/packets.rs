//! The TC ingress program packet by packet, with `BPF_PROG_TEST_RUN` (aya's `TestRun`), in
//! the style of Cilium's `bpf/tests`: each case seeds the maps through the agent's real writer,
//! runs one hand-built frame (`proxy_tests::frames`) through the real object, and checks the
//! verdict, the frame that comes out (addresses, ports, checksums recomputed independently) and
//! the drop counters. Each case opens with a one-line `Flow:` comment. Cases that apply to
//! both IPv4 and IPv6 run once per [`Family`], each in a bed of its own; IPv6-only ones
//! (extension headers, ICMPv6, UDP's mandatory checksum) and IPv4-only ones (ICMP, UDP without
//! a checksum, source ranges) follow.
//!
//! The object is loaded by the agent's own datapath code into a throwaway network namespace
//! (where the program's FIB lookups run: an interface on the node network with a route to
//! the pod network, forwarding on) and cgroup; everything is removed on drop.
//!
//! Checksum offload: `BPF_PROG_TEST_RUN` builds its skb with `CHECKSUM_NONE` and `__sk_buff`
//! has no field to ask for `CHECKSUM_PARTIAL`, so the offload case cannot be driven from here;
//! the full-checksum case is, and so is UDP's "no checksum" (0), which must stay 0. The offload
//! path is covered end to end by the NodePort tests over veths with offload on.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{TestRun as _, TestRunOptions},
};
use proxy_agent::{
    datapath::{Datapath, LoadOptions, writer::Writer},
    maglev::{self, MaglevSettings},
    model::{Cidr, Endpoint, Frontend, FrontendEntry, FrontendKind, ServicePortName},
    observe::drops,
};
use proxy_common::{
    addr,
    conntrack::{CT_F_CLOSING, CT_F_DSR, CT_F_LOCAL, CT_F_REPLY, CtKey, CtValue, SNAT_PORT_MAX, SNAT_PORT_MIN},
    drop, maps,
    proto::{TCP, UDP},
    service::{
        SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_DSR, SVC_F_EXT_LOCAL, SVC_F_LOAD_BALANCER, SVC_F_MAGLEV,
        SVC_F_NODE_PORT, SVC_F_SOURCE_RANGES, SVC_F_TWO_SCOPES,
    },
};
use proxy_tests::{
    cgroup::Cgroup,
    frames::{
        self, ACK, FIN, ICMP, ICMP_DEST_UNREACH, ICMPV6, ICMPV6_NEIGHBOUR_SOLICITATION, ICMPV6_PKT_TOOBIG, IP6_HLEN,
        MORE_FRAGMENTS, NEXTHDR_DEST, NEXTHDR_FRAGMENT, NEXTHDR_HOP, SYN,
    },
    netns::{Netns, require_root},
    trace::{Trace, drain_events, trace_on},
};

const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(172, 18, 0, 100), 40000);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const NODE_PORT: u16 = 30066;
const LB_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 255, 1);
const TARGET_PORT: u16 = 80;
/// The IPv6 twins, in kind's IPv6 node network and the ULA pod range of issue 14's test bed.
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 0x64);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2);
const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 1);
const REMOTE_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 2);

/// The family a case runs in, and its addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// Every family, for the cases that hold for both.
    const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn pick(self, v4: Ipv4Addr, v6: Ipv6Addr) -> IpAddr {
        match self {
            Family::V4 => v4.into(),
            Family::V6 => v6.into(),
        }
    }

    fn node(self) -> IpAddr {
        self.pick(NODE, NODE6)
    }

    fn client(self) -> SocketAddr {
        SocketAddr::new(self.pick(*CLIENT.ip(), CLIENT6), CLIENT.port())
    }

    fn nodeport(self) -> SocketAddr {
        SocketAddr::new(self.node(), NODE_PORT)
    }

    fn pod(self, port: u16) -> SocketAddr {
        SocketAddr::new(self.pick(POD, POD6), port)
    }

    fn remote_pod(self) -> IpAddr {
        self.pick(Ipv4Addr::new(10, 244, 2, 2), REMOTE_POD6)
    }

    /// A fragment of a UDP datagram from the client to the node: `offset` in 8-byte units,
    /// `more` the "more fragments" flag, `part` the bytes it carries.
    fn fragment(self, id: u16, offset: u16, more: bool, part: &[u8]) -> Vec<u8> {
        let (src, dst) = (self.client().ip(), self.node());
        frames::ethernet(&match (src, dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                frames::ipv4(src, dst, UDP, id, offset | if more { MORE_FRAGMENTS } else { 0 }, part)
            }
            _ => {
                let header = frames::fragment_header(UDP, offset, more, u32::from(id) << 16 | 0xbeef);
                frames::ipv6(CLIENT6, NODE6, NEXTHDR_FRAGMENT, &[header, part.to_vec()].concat())
            }
        })
    }
}

/// `TC_ACT_OK`: the packet goes on into the stack.
const PASS: u32 = 0;
/// `TC_ACT_SHOT`: dropped.
const SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`: sent out of the interface the FIB picked (`bpf_redirect_neigh`).
const REDIRECT: u32 = 7;

fn nodeport() -> SocketAddrV4 {
    SocketAddrV4::new(NODE, NODE_PORT)
}

fn pod(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(POD, port)
}

/// An endpoint at `address`, on this node or (not `local`) on one that takes direct server
/// return, as every node of a cluster running the agent does.
fn endpoint(address: impl Into<IpAddr>, local: bool) -> Endpoint {
    Endpoint { address: address.into(), port: TARGET_PORT, local, terminating: false, dsr: true }
}

/// A frontend entry of `kind` with `flags` and `backends`.
fn entry(kind: FrontendKind, proto: u8, flags: u16, backends: Vec<Endpoint>) -> FrontendEntry {
    FrontendEntry {
        service: ServicePortName { namespace: "packets".into(), name: "web".into(), port: String::new(), proto },
        kind,
        flags,
        affinity_timeout: 0,
        backends,
        internal: None,
        source_ranges: Vec::new(),
    }
}

/// One case's datapath: the real object loaded in a namespace of its own, maps written by
/// the real writer, and the ingress program to run frames through.
struct Bed {
    datapath: Datapath,
    writer: Writer<proxy_agent::datapath::AyaMaps>,
    root: PathBuf,
    ifindex: u32,
}

/// What one run returned.
struct Out {
    verdict: u32,
    frame: Vec<u8>,
}

impl Bed {
    /// Programs `entry` at `frontend`.
    fn service(&mut self, frontend: impl Into<SocketAddr>, proto: u8, entry: &FrontendEntry) {
        let frontend = frontend.into();
        let frontend = Frontend { address: frontend.ip(), port: frontend.port(), proto };
        self.writer.upsert(frontend, entry).expect("writing the service");
    }

    /// Runs `frame` through the ingress program as if it arrived on the node's interface.
    fn ingress(&self, frame: &[u8]) -> Out {
        let program = self.datapath.tc_program().expect("the TC ingress program");
        // struct __sk_buff up to `ifindex`: len, pkt_type, mark, queue_mapping, protocol,
        // vlan_present, vlan_tci, vlan_proto, priority, ingress_ifindex, ifindex.
        let mut ctx = [0u8; 44];
        ctx[36..40].copy_from_slice(&self.ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&self.ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 64];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        Out { verdict: result.return_value, frame: out }
    }

    /// Every drop reason's count (reasons at 0 left out).
    fn drops(&self) -> BTreeMap<&'static str, u64> {
        let counts = drops::read(&self.root.join(maps::DROPS)).expect("reading the drop counters");
        counts.into_iter().filter(|c| c.count > 0).map(|c| (c.reason, c.count)).collect()
    }

    fn conntrack(&self) -> HashMap<MapData, CtKey, CtValue> {
        let data = MapData::from_pin(self.root.join(maps::CONNTRACK)).expect("the pinned conntrack map");
        HashMap::try_from(Map::LruHashMap(data)).expect("conntrack is an LRU hash")
    }
}

/// Removes the bed's pins (programs detached) on drop, also when the case fails.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = proxy_agent::datapath::cleanup(&self.0);
    }
}

/// Runs `case` against a fresh datapath in a throwaway namespace, on a thread that entered
/// it (BPF_PROG_TEST_RUN's FIB lookups use the caller's namespace).
fn with_bed(name: &str, case: impl FnOnce(&mut Bed) + Send) {
    require_root().expect("packet tests load BPF programs");
    let ns = Netns::new("pkt").expect("a test namespace");
    // A veth pair with both ends in the namespace (no dummy driver needed), so eth0 has a carrier.
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]).expect("a veth pair");
    ns.ip(&["addr", "add", &format!("{NODE}/16"), "dev", "eth0"]).expect("the node address");
    for link in ["eth0", "eth1"] {
        ns.ip(&["link", "set", link, "up"]).expect("link up");
    }
    // `nodad`: the address is usable at once, with no duplicate address detection to wait for.
    ns.ip(&["addr", "add", &format!("{NODE6}/64"), "dev", "eth0", "nodad"]).expect("the node's IPv6 address");
    ns.ip(&["route", "add", "10.244.0.0/16", "dev", "eth0"]).expect("the pod route");
    ns.ip(&["route", "add", "fd00:10:244::/48", "dev", "eth0"]).expect("the IPv6 pod route");
    ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).expect("forwarding on");
    ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]).expect("IPv6 forwarding on");
    let cgroup = Cgroup::new("proxy-packets").expect("a test cgroup");
    let pins = Pins(PathBuf::from(format!("/sys/fs/bpf/proxy-packets-{name}-{}", std::process::id())));
    std::thread::scope(|s| {
        let run = s.spawn(|| {
            ns.enter().expect("entering the test namespace");
            let ifindex = ifindex_by_name("eth0");
            let opts = LoadOptions {
                bpf_root: pins.0.clone(),
                cgroup: cgroup.path().to_owned(),
                services_max: 1024,
                backends_max: 1024,
                affinity_max: 1024,
                conntrack_max: 16_384,
                sock_hostns_only: false,
                preallocate: false,
            };
            let (datapath, store) = Datapath::load(&opts).expect("loading the datapath");
            let mut bed = Bed { datapath, writer: Writer::new(store), root: pins.0.clone(), ifindex };
            case(&mut bed);
        });
        if let Err(panic) = run.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

/// The index of `name` in the thread's namespace (not from /sys, which shows the namespace it
/// was mounted in).
fn ifindex_by_name(name: &str) -> u32 {
    let name = std::ffi::CString::new(name).expect("an interface name");
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {name:?} in the test namespace");
    index
}

/// The ports of the reply entry a SNATed flow opened: the node-side source port it was given.
fn snat_port(bed: &Bed, backend: impl Into<SocketAddr>, proto: u8) -> u16 {
    let backend = backend.into();
    let ports: Vec<u16> = bed
        .conntrack()
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| {
            v.flags & CT_F_REPLY != 0
                && k.src == addr::from_ip(backend.ip())
                && k.sport == backend.port()
                && k.proto == proto
        })
        .map(|(k, _)| k.dport)
        .collect();
    assert_eq!(ports.len(), 1, "one flow to {backend}: {ports:?}");
    ports[0]
}

fn nodeport_service(bed: &mut Bed, family: Family, proto: u8) {
    let web = entry(FrontendKind::NodePort, proto, SVC_F_NODE_PORT, vec![endpoint(family.pod(0).ip(), false)]);
    bed.service(family.nodeport(), proto, &web);
}

/// Runs `case` once per family, each in a bed of its own (named `name` and the family).
fn for_each_family(name: &str, case: impl Fn(&mut Bed, Family) + Sync) {
    for family in Family::ALL {
        with_bed(&format!("{name}-{family:?}"), |bed| case(bed, family));
    }
}

#[test]
fn a_nodeport_syn_is_dnated_and_snated_with_correct_checksums() {
    // Flow: client:40000 → node:30066 SYN  ⇒  node:P → pod:80 SYN (P a SNAT port), redirected.
    for_each_family("syn", |bed, family| {
        nodeport_service(bed, family, TCP);
        let out = bed.ingress(&frames::tcp_frame(family.client(), family.nodeport(), SYN));
        assert_eq!(out.verdict, REDIRECT);
        let seen = frames::seen(&out.frame);
        let pod = family.pod(TARGET_PORT);
        assert_eq!((seen.src.ip(), seen.dst), (family.node(), pod), "DNAT to the pod, SNAT to the node");
        assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&seen.src.port()), "a SNAT port: {seen:?}");
        assert_eq!(seen.src.port(), snat_port(bed, pod, TCP), "the port the flow's reply entry holds");
        assert!(frames::ip_checksum_ok(&out.frame), "IPv4 checksum");
        assert!(frames::frame_l4_checksum_ok(&out.frame), "TCP checksum");
        assert_eq!(bed.drops(), BTreeMap::new());
    });
}

#[test]
fn the_reply_is_translated_back_to_the_nodeport() {
    // Flow: pod:80 → node:P SYN-ACK (a flow's reply)  ⇒  node:30066 → client:40000, redirected.
    for_each_family("reply", |bed, family| {
        nodeport_service(bed, family, TCP);
        assert_eq!(bed.ingress(&frames::tcp_frame(family.client(), family.nodeport(), SYN)).verdict, REDIRECT);
        let pod = family.pod(TARGET_PORT);
        let port = snat_port(bed, pod, TCP);
        let out = bed.ingress(&frames::tcp_frame(pod, SocketAddr::new(family.node(), port), SYN | ACK));
        assert_eq!(out.verdict, REDIRECT);
        let expected = frames::Seen { src: family.nodeport(), dst: family.client(), proto: TCP };
        assert_eq!(frames::seen(&out.frame), expected);
        assert!(frames::ip_checksum_ok(&out.frame) && frames::frame_l4_checksum_ok(&out.frame), "checksums");
    });
}

#[test]
fn an_icmp_error_quoting_a_tracked_flow_reaches_the_client_as_about_its_own_packet() {
    // Flow: gw → node ICMP unreachable quoting node:P → pod:80  ⇒  gw → client, quoting
    // client:40000 → node:30066.
    with_bed("icmp", |bed| {
        nodeport_service(bed, Family::V4, TCP);
        let syn = bed.ingress(&frames::tcp_frame(CLIENT, nodeport(), SYN));
        // The translated packet's IPv4 header and first 8 bytes, as a router quotes them.
        let quoted = [frames::ip_header(&syn.frame), &frames::ip_payload(&syn.frame)[..8]].concat();
        let icmp = frames::icmp_error(ICMP_DEST_UNREACH, 3, &quoted);
        let out = bed.ingress(&frames::ethernet(&frames::ipv4(GATEWAY, NODE, ICMP, 9, 0, &icmp)));
        assert_eq!(out.verdict, REDIRECT);
        let ip = frames::ip_header(&out.frame);
        assert_eq!((&ip[12..16], &ip[16..20]), (&GATEWAY.octets()[..], &CLIENT.ip().octets()[..]), "to the client");
        assert!(frames::ip_checksum_ok(&out.frame), "outer IPv4 checksum");
        let message = frames::ip_payload(&out.frame);
        assert_eq!(frames::checksum(message), 0, "ICMP checksum");
        let inner = &message[8..];
        assert_eq!(frames::checksum(&inner[..20]), 0, "the quoted header's checksum");
        // The quote as a packet of its own (its length field is the whole original's).
        let quoted = frames::seen(&frames::ethernet(&frames::ipv4(
            Ipv4Addr::new(inner[12], inner[13], inner[14], inner[15]),
            Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]),
            TCP,
            0,
            0,
            &inner[20..],
        )));
        assert_eq!(
            (quoted.src, quoted.dst),
            (CLIENT.into(), nodeport().into()),
            "the client's own packet, as it sent it"
        );
    });
}

#[test]
fn an_icmpv6_packet_too_big_quoting_a_tracked_flow_reaches_the_client_with_correct_checksums() {
    // Flow: gw → node ICMPv6 Packet Too Big (MTU 1280) quoting node:P → pod:80  ⇒  gw → client,
    // quoting client:40000 → [node]:30066, MTU kept: path MTU discovery through a nodePort.
    with_bed("ptb6", |bed| {
        let family = Family::V6;
        nodeport_service(bed, family, TCP);
        let syn = bed.ingress(&frames::tcp_frame(family.client(), family.nodeport(), SYN));
        assert_eq!(syn.verdict, REDIRECT);
        // As much of the translated packet as fits, as a router quotes it.
        let quoted = &syn.frame[14..];
        let icmp = frames::icmp6(GATEWAY6, NODE6, ICMPV6_PKT_TOOBIG, 0, 1280, quoted);
        let out = bed.ingress(&frames::ethernet(&frames::ipv6(GATEWAY6, NODE6, ICMPV6, &icmp)));
        assert_eq!(out.verdict, REDIRECT);
        assert_eq!(frames::addresses(&out.frame), (GATEWAY6.into(), CLIENT6.into()), "to the client");
        let message = frames::ip_payload(&out.frame);
        assert_eq!((message[0], &message[4..8]), (ICMPV6_PKT_TOOBIG, &1280u32.to_be_bytes()[..]), "the MTU");
        assert!(frames::icmp6_checksum_ok(GATEWAY6, CLIENT6, message), "ICMPv6 checksum, pseudo header and all");
        let quoted = frames::seen(&frames::ethernet(&message[8..]));
        assert_eq!((quoted.src, quoted.dst), (family.client(), family.nodeport()), "the client's own packet");
        assert_eq!(&message[8 + IP6_HLEN + 4..], &quoted_tail(&syn.frame)[..], "the rest of the quote untouched");
        assert_eq!(bed.drops(), BTreeMap::new());
    });
}

/// A TCP frame's bytes after its ports: what translating a quote of it leaves alone.
fn quoted_tail(frame: &[u8]) -> Vec<u8> {
    frames::upper(frame).1[4..].to_vec()
}

#[test]
fn a_neighbour_solicitation_passes_byte_for_byte() {
    // Flow: client → node's solicited-node multicast, ICMPv6 Neighbour Solicitation  ⇒
    // passed unchanged; nothing counted.
    with_bed("ns6", |bed| {
        nodeport_service(bed, Family::V6, TCP);
        let multicast = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 2);
        let message = frames::icmp6(CLIENT6, multicast, ICMPV6_NEIGHBOUR_SOLICITATION, 0, 0, &NODE6.octets());
        let frame = frames::ethernet(&frames::ipv6(CLIENT6, multicast, ICMPV6, &message));
        let out = bed.ingress(&frame);
        assert_eq!((out.verdict, &out.frame), (PASS, &frame));
        assert_eq!(bed.drops(), BTreeMap::new());
    });
}

#[test]
fn extension_headers_before_tcp_are_walked_and_the_syn_still_translated() {
    // Flow: client → [node]:30066 SYN behind hop-by-hop and destination options headers  ⇒
    // node:P → pod:80, headers kept, TCP checksum right.
    with_bed("ext6", |bed| {
        let family = Family::V6;
        nodeport_service(bed, family, TCP);
        let headers = [frames::options_header(NEXTHDR_DEST), frames::options_header(TCP)].concat();
        let segment = frames::tcp(family.client(), family.nodeport(), SYN, &[]);
        let frame = frames::ethernet(&frames::ipv6(CLIENT6, NODE6, NEXTHDR_HOP, &[headers.clone(), segment].concat()));
        let out = bed.ingress(&frame);
        assert_eq!(out.verdict, REDIRECT);
        let seen = frames::seen(&out.frame);
        assert_eq!((seen.src.ip(), seen.dst, seen.proto), (family.node(), family.pod(TARGET_PORT), TCP));
        assert_eq!(&frames::ip_payload(&out.frame)[..headers.len()], &headers[..], "extension headers untouched");
        assert!(frames::frame_l4_checksum_ok(&out.frame), "TCP checksum");
        assert_eq!(bed.drops(), BTreeMap::new());
    });
}

#[test]
fn more_extension_headers_than_the_bound_pass_to_the_stack_and_are_counted() {
    // Flow: client → [node]:30066 SYN behind five destination options headers (the walk stops
    // at four, as Cilium's)  ⇒  passed untouched; malformed +1.
    with_bed("ext6max", |bed| {
        let family = Family::V6;
        nodeport_service(bed, family, TCP);
        let mut payload = Vec::new();
        for last in [false, false, false, false, true] {
            payload.extend(frames::options_header(if last { TCP } else { NEXTHDR_DEST }));
        }
        payload.extend(frames::tcp(family.client(), family.nodeport(), SYN, &[]));
        let frame = frames::ethernet(&frames::ipv6(CLIENT6, NODE6, NEXTHDR_DEST, &payload));
        let out = bed.ingress(&frame);
        assert_eq!((out.verdict, &out.frame), (PASS, &frame));
        assert_eq!(bed.drops(), BTreeMap::from([(drop::name(drop::MALFORMED), 1)]));
    });
}

#[test]
fn a_udp_datagram_over_ipv6_is_translated_with_a_correct_checksum() {
    // Flow: client:40000 → [node]:30066 UDP  ⇒  node:P → pod:80, UDP checksum right (never 0:
    // IPv6 has no "none").
    with_bed("udp6", |bed| {
        let family = Family::V6;
        nodeport_service(bed, family, UDP);
        let out = bed.ingress(&frames::udp_frame(family.client(), family.nodeport(), 5, b"hello"));
        assert_eq!(out.verdict, REDIRECT);
        let seen = frames::seen(&out.frame);
        assert_eq!((seen.src.ip(), seen.dst), (family.node(), family.pod(TARGET_PORT)));
        assert!(frames::frame_l4_checksum_ok(&out.frame), "UDP checksum");
        assert_ne!(&frames::upper(&out.frame).1[6..8], &[0, 0], "a checksum, not none");
    });
}

#[test]
fn fragments_follow_their_first_one_and_reassemble_with_a_correct_checksum() {
    // Flow: client → node:30066 UDP in two fragments  ⇒  node:P → pod:80, both; the
    // reassembled datagram's UDP checksum holds under the new addresses.
    for_each_family("frags", |bed, family| {
        nodeport_service(bed, family, UDP);
        let datagram = frames::udp(family.client(), family.nodeport(), &[7u8; 64], true);
        let (first, rest) = datagram.split_at(40);
        let first = bed.ingress(&family.fragment(77, 0, true, first));
        let later = bed.ingress(&family.fragment(77, 40 / 8, false, rest));
        assert_eq!((first.verdict, later.verdict), (REDIRECT, REDIRECT));
        let (node, pod) = (family.node(), family.pod(TARGET_PORT));
        let seen = frames::seen(&first.frame);
        assert_eq!((seen.src.ip(), seen.dst), (node, pod));
        assert_eq!(frames::addresses(&later.frame), (node, pod.ip()), "same addresses");
        assert!(frames::ip_checksum_ok(&first.frame) && frames::ip_checksum_ok(&later.frame), "IPv4 checksums");
        assert_eq!(frames::upper(&later.frame).1, rest, "a later fragment's payload is not touched");
        let whole: Vec<u8> = [frames::upper(&first.frame).1, frames::upper(&later.frame).1].concat();
        assert!(frames::l4_checksum_ok(node, pod.ip(), UDP, &whole), "UDP checksum of the reassembled datagram");
        assert_eq!(bed.drops(), BTreeMap::new());
    });
}

#[test]
fn a_later_fragment_without_its_first_passes_untouched_and_is_counted() {
    // Flow: client → node, a later fragment never preceded by its first  ⇒  passed as is; +1.
    for_each_family("lonefrag", |bed, family| {
        nodeport_service(bed, family, UDP);
        let frame = family.fragment(78, 5, false, &[1u8; 24]);
        let out = bed.ingress(&frame);
        assert_eq!((out.verdict, &out.frame), (PASS, &frame));
        assert_eq!(bed.drops(), BTreeMap::from([(drop::name(drop::FRAGMENT_WITHOUT_STATE), 1)]));
    });
}

#[test]
fn a_udp_datagram_without_a_checksum_keeps_none() {
    // Flow: client:40000 → node:30066 UDP, checksum 0  ⇒  node:P → pod:80, checksum still 0.
    with_bed("udp0", |bed| {
        nodeport_service(bed, Family::V4, UDP);
        let datagram = frames::udp(CLIENT, nodeport(), b"hello", false);
        let out = bed.ingress(&frames::ethernet(&frames::ipv4(*CLIENT.ip(), NODE, UDP, 5, 0, &datagram)));
        assert_eq!(out.verdict, REDIRECT);
        let seen = frames::seen(&out.frame);
        assert_eq!((seen.src.ip(), seen.dst), (NODE.into(), pod(TARGET_PORT).into()));
        assert!(frames::ip_checksum_ok(&out.frame));
        assert_eq!(&frames::ip_payload(&out.frame)[6..8], &[0, 0], "no checksum stays no checksum");
    });
}
#[test]
fn trace_shows_a_new_flow_with_its_snat_and_a_drop_with_its_reason() {
    // Flow: client → node:30066 SYN ⇒ a `tc` line with backend and SNAT address:port; client →
    // lb:80 SYN outside the source ranges ⇒ a `tc` line with source_range_denied.
    with_bed("trace", |bed| {
        nodeport_service(bed, Family::V4, TCP);
        let flags = SVC_F_LOAD_BALANCER | SVC_F_SOURCE_RANGES;
        let mut lb = entry(FrontendKind::LoadBalancer, TCP, flags, vec![endpoint(POD, false)]);
        lb.source_ranges = vec!["192.0.2.0/24".parse::<Cidr>().expect("a CIDR")];
        bed.service(SocketAddrV4::new(LB_IP, 80), TCP, &lb);
        let wait = std::time::Duration::from_secs(5);
        let trace = Trace::start(env!("CARGO_BIN_EXE_agent").as_ref(), &bed.root, &[], wait).expect("trace");
        assert_eq!(bed.ingress(&frames::tcp_frame(CLIENT, nodeport(), SYN)).verdict, REDIRECT);
        assert_eq!(bed.ingress(&frames::tcp_frame(CLIENT, SocketAddrV4::new(LB_IP, 80), SYN)).verdict, SHOT);
        let lines = trace.collect(wait, |seen| seen.len() >= 2);
        trace.stop(wait).expect("trace stops on SIGTERM");
        assert_eq!(trace_on(&bed.root).expect("reading trace_on"), 0, "the flag is off after trace");
        lines.iter().for_each(|l| eprintln!("{l}"));
        assert_eq!(lines.len(), 2, "{lines:#?}");
        let (flow, denied) = (&lines[0], &lines[1]);
        assert_eq!((flow["path"].as_str(), flow["client"].as_str()), (Some("tc"), Some("172.18.0.100:40000")));
        assert_eq!(flow["frontend"], format!("{}/TCP", nodeport()));
        assert_eq!(flow["service"], "packets/web");
        assert_eq!(flow["backend"], format!("{}/TCP", pod(TARGET_PORT)));
        let snat = SocketAddrV4::new(NODE, snat_port(bed, pod(TARGET_PORT), TCP));
        assert_eq!(flow["snat"], snat.to_string(), "the SNAT port the flow holds: {flow}");
        assert!(flow.get("drop").is_none());
        assert_eq!(denied["path"], "tc");
        assert_eq!(denied["frontend"], format!("{LB_IP}:80/TCP"));
        assert_eq!(denied["drop"], drop::name(drop::SOURCE_RANGE_DENIED));
        assert!(denied.get("backend").is_none() && denied.get("snat").is_none(), "{denied}");

        // Nobody traces now: the programs write nothing (trace read everything it was sent).
        assert_eq!(drain_events(&bed.root).expect("reading the ring"), 0);
        assert_eq!(bed.ingress(&frames::tcp_frame(CLIENT, nodeport(), SYN | ACK)).verdict, REDIRECT);
        assert_eq!(bed.ingress(&frames::tcp_frame(CLIENT, SocketAddrV4::new(LB_IP, 80), SYN)).verdict, SHOT);
        assert_eq!(drain_events(&bed.root).expect("reading the ring"), 0, "no events with tracing off");
    });
}

#[test]
fn a_client_outside_the_source_ranges_is_dropped_and_counted() {
    // Flow: client → lb:80 SYN, ranges 192.0.2.0/24 only  ⇒  dropped; source_range_denied +1.
    with_bed("ranges", |bed| {
        let flags = SVC_F_LOAD_BALANCER | SVC_F_SOURCE_RANGES;
        let mut lb = entry(FrontendKind::LoadBalancer, TCP, flags, vec![endpoint(POD, false)]);
        lb.source_ranges = vec!["192.0.2.0/24".parse::<Cidr>().expect("a CIDR")];
        bed.service(SocketAddrV4::new(LB_IP, 80), TCP, &lb);
        let out = bed.ingress(&frames::tcp_frame(CLIENT, SocketAddrV4::new(LB_IP, 80), SYN));
        assert_eq!(out.verdict, SHOT);
        assert_eq!(bed.drops(), BTreeMap::from([(drop::name(drop::SOURCE_RANGE_DENIED), 1)]));
        assert_eq!(bed.conntrack().keys().count(), 0, "no flow opened");
    });
}

#[test]
fn etp_local_without_a_local_endpoint_is_dropped_and_counted() {
    // Flow: client → node:30066 SYN, eTP=Local, the only endpoint remote  ⇒  dropped;
    // no_local_endpoint +1.
    for_each_family("local", |bed, family| {
        let flags = SVC_F_NODE_PORT | SVC_F_EXT_LOCAL | SVC_F_TWO_SCOPES;
        let mut web = entry(FrontendKind::NodePort, TCP, flags, Vec::new());
        web.internal = Some(vec![endpoint(family.remote_pod(), false)]);
        bed.service(family.nodeport(), TCP, &web);
        let out = bed.ingress(&frames::tcp_frame(family.client(), family.nodeport(), SYN));
        assert_eq!(out.verdict, SHOT);
        assert_eq!(bed.drops(), BTreeMap::from([(drop::name(drop::NO_LOCAL_ENDPOINT), 1)]));
    });
}

#[test]
fn etp_local_keeps_the_client_address() {
    // Flow: client:40000 → node:30066 SYN, eTP=Local, a local endpoint  ⇒  client:40000 →
    // pod:80 (no SNAT), checksums right.
    for_each_family("keep", |bed, family| {
        let flags = SVC_F_NODE_PORT | SVC_F_EXT_LOCAL;
        let web = entry(FrontendKind::NodePort, TCP, flags, vec![endpoint(family.pod(0).ip(), true)]);
        bed.service(family.nodeport(), TCP, &web);
        let out = bed.ingress(&frames::tcp_frame(family.client(), family.nodeport(), SYN));
        assert_eq!(out.verdict, REDIRECT);
        let seen = frames::seen(&out.frame);
        assert_eq!((seen.src, seen.dst), (family.client(), family.pod(TARGET_PORT)));
        assert!(frames::ip_checksum_ok(&out.frame) && frames::frame_l4_checksum_ok(&out.frame), "checksums");
    });
}

#[test]
fn a_host_network_endpoint_is_dnated_without_snat_and_handed_to_the_stack() {
    // Flow: client:40000 → node:30066 SYN, the endpoint the node itself (hostNetwork)  ⇒
    // client:40000 → node:80, passed to the stack; both entries marked local (the egress
    // program translates the reply).
    for_each_family("hostnet", |bed, family| {
        let web = entry(FrontendKind::NodePort, TCP, SVC_F_NODE_PORT, vec![endpoint(family.node(), true)]);
        bed.service(family.nodeport(), TCP, &web);
        let out = bed.ingress(&frames::tcp_frame(family.client(), family.nodeport(), SYN));
        assert_eq!(out.verdict, PASS);
        let seen = frames::seen(&out.frame);
        assert_eq!((seen.src, seen.dst), (family.client(), SocketAddr::new(family.node(), TARGET_PORT)), "no SNAT");
        assert!(frames::ip_checksum_ok(&out.frame) && frames::frame_l4_checksum_ok(&out.frame), "checksums");
        let flags: Vec<u16> = bed.conntrack().iter().filter_map(Result::ok).map(|(_, v)| v.flags).collect();
        assert_eq!(flags.len(), 2, "both directions tracked");
        assert!(flags.iter().all(|f| f & CT_F_LOCAL != 0), "both local: {flags:?}");
        assert_eq!(bed.drops(), BTreeMap::new());
    });
}

#[test]
fn no_endpoint_anywhere_goes_to_the_stack_to_be_reset_and_is_counted() {
    // Flow: client → node:30066 SYN, no endpoint  ⇒  passed untouched (the stack answers
    // with a RST: kube-proxy's REJECT); no_endpoint +1.
    for_each_family("none", |bed, family| {
        bed.service(family.nodeport(), TCP, &entry(FrontendKind::NodePort, TCP, SVC_F_NODE_PORT, Vec::new()));
        let frame = frames::tcp_frame(family.client(), family.nodeport(), SYN);
        let out = bed.ingress(&frame);
        assert_eq!((out.verdict, &out.frame), (PASS, &frame));
        assert_eq!(bed.drops(), BTreeMap::from([(drop::name(drop::NO_ENDPOINT), 1)]));
    });
}

#[test]
fn a_mid_connection_packet_without_a_flow_is_dropped_and_counted() {
    // Flow: client → node:30066 ACK, no tracked flow  ⇒  dropped (ctstate INVALID);
    // not_a_new_connection +1.
    for_each_family("invalid", |bed, family| {
        nodeport_service(bed, family, TCP);
        let out = bed.ingress(&frames::tcp_frame(family.client(), family.nodeport(), ACK));
        assert_eq!(out.verdict, SHOT);
        assert_eq!(bed.drops(), BTreeMap::from([(drop::name(drop::NOT_A_NEW_CONNECTION), 1)]));
    });
}

#[test]
fn a_new_flow_whose_snat_ports_are_all_taken_is_dropped_and_taken_ports_are_kept() {
    // Flow: client → node:30066 SYN, every node:P ← pod:80 reply tuple already held  ⇒
    // dropped; snat_ports_exhausted +1; the holders' entries unchanged.
    for_each_family("snat", |bed, family| {
        nodeport_service(bed, family, TCP);
        let mut conntrack = bed.conntrack();
        let holder = CtValue { dst: addr::from_v4([172, 18, 0, 101]), flags: CT_F_REPLY, ..CtValue::default() };
        let key = |port| CtKey {
            src: addr::from_ip(family.pod(0).ip()),
            dst: addr::from_ip(family.node()),
            sport: TARGET_PORT,
            dport: port,
            proto: TCP,
            _pad: [0; 3],
        };
        for port in SNAT_PORT_MIN..=SNAT_PORT_MAX {
            conntrack.insert(key(port), holder, 0).expect("holding a SNAT port");
        }
        let out = bed.ingress(&frames::tcp_frame(family.client(), family.nodeport(), SYN));
        assert_eq!(out.verdict, SHOT);
        assert_eq!(bed.drops(), BTreeMap::from([(drop::name(drop::SNAT_PORTS_EXHAUSTED), 1)]));
        let conntrack = bed.conntrack();
        for port in SNAT_PORT_MIN..=SNAT_PORT_MAX {
            assert_eq!(conntrack.get(&key(port), 0).expect("still held"), holder, "port {port}");
        }
        let client_flow = CtKey {
            src: addr::from_ip(family.client().ip()),
            dst: addr::from_ip(family.node()),
            sport: CLIENT.port(),
            dport: NODE_PORT,
            proto: TCP,
            _pad: [0; 3],
        };
        assert!(conntrack.get(&client_flow, 0).is_err(), "no flow opened");
    });
}

#[test]
fn traffic_for_no_service_passes_byte_for_byte() {
    // Flow: client → node:22 SYN, and a UDP datagram to node:53  ⇒  both passed, unchanged;
    // nothing counted.
    for_each_family("other", |bed, family| {
        nodeport_service(bed, family, TCP);
        let ssh = frames::tcp_frame(family.client(), SocketAddr::new(family.node(), 22), SYN);
        let dns = frames::udp_frame(family.client(), SocketAddr::new(family.node(), 53), 3, b"q");
        for frame in [ssh, dns] {
            let out = bed.ingress(&frame);
            assert_eq!((out.verdict, &out.frame), (PASS, &frame));
        }
        assert_eq!(bed.drops(), BTreeMap::new());
        assert_eq!(bed.conntrack().keys().count(), 0);
    });
}

/// Six pods of the family, hosts 2 to 7 of its pod range, for the Maglev cases.
fn maglev_pods(family: Family) -> Vec<IpAddr> {
    (2..8)
        .map(|host| {
            family.pick(Ipv4Addr::new(10, 244, 1, host), Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, host.into()))
        })
        .collect()
}

/// A nodePort of the family over its six pods that picks by Maglev (table size 251), with
/// `flags` added.
fn maglev_service(bed: &mut Bed, family: Family, flags: u16, affinity_timeout: u32) -> MaglevSettings {
    let settings = MaglevSettings { table_size: 251, ..MaglevSettings::default() };
    bed.writer.set_maglev(settings.clone()).expect("writing the seed");
    let pods = maglev_pods(family).into_iter().map(|p| endpoint(p, false)).collect();
    let web = FrontendEntry {
        affinity_timeout,
        ..entry(FrontendKind::NodePort, TCP, SVC_F_NODE_PORT | SVC_F_MAGLEV | flags, pods)
    };
    bed.service(family.nodeport(), TCP, &web);
    settings
}

/// The pod in the slot `hash` selects of the table the agent's pure builder makes (pods named
/// by their 16-byte map address and port).
fn pod_in_slot(settings: &MaglevSettings, family: Family, hash: u32) -> SocketAddr {
    let named: Vec<(IpAddr, Vec<u8>)> =
        maglev_pods(family).into_iter().map(|p| (p, maglev::backend_name(addr::from_ip(p), TARGET_PORT))).collect();
    let table = maglev::build(&named, settings.table_size, &settings.seed);
    SocketAddr::new(table[proxy_common::maglev::slot(hash, settings.table_size) as usize - 1], TARGET_PORT)
}

/// The datapath's hash of the flow from `client` to the family's nodePort.
fn flow_hash(settings: &MaglevSettings, family: Family, client: SocketAddr) -> u32 {
    let key = CtKey {
        src: addr::from_ip(client.ip()),
        dst: addr::from_ip(family.node()),
        sport: client.port(),
        dport: NODE_PORT,
        proto: TCP,
        _pad: [0; 3],
    };
    proxy_common::maglev::flow_hash(&key, settings.flow_seed())
}

#[test]
fn maglev_sends_a_new_flow_to_the_table_slot_of_its_hash() {
    // Flow: client:P → node:30066 SYN for 32 client ports P, a Maglev nodePort over six pods  ⇒
    // node:S → pod:80, the pod in slot 1 + hash(5-tuple) % 251 of the builder's table.
    for_each_family("maglev", |bed, family| {
        let settings = maglev_service(bed, family, 0, 0);
        let mut reached = std::collections::BTreeSet::new();
        for port in 40_000..40_032 {
            let client = SocketAddr::new(family.client().ip(), port);
            let out = bed.ingress(&frames::tcp_frame(client, family.nodeport(), SYN));
            assert_eq!(out.verdict, REDIRECT, "port {port}");
            let want = pod_in_slot(&settings, family, flow_hash(&settings, family, client));
            assert_eq!(frames::seen(&out.frame).dst, want, "port {port}");
            reached.insert(want);
        }
        assert!(reached.len() >= 3, "the flows spread over the pods: {reached:?}");
    });
}

#[test]
fn maglev_with_client_ip_affinity_hashes_the_client_address_only() {
    // Flow: client C:P → node:30066 SYN for 16 client addresses C, two ports each, ClientIP
    // affinity  ⇒  both to the pod in slot 1 + hash(C) % 251.
    for_each_family("maglev-affinity", |bed, family| {
        let settings = maglev_service(bed, family, SVC_F_AFFINITY, 600);
        for host in 100..116 {
            let address = family.pick(
                Ipv4Addr::new(172, 18, 0, host),
                Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, host.into()),
            );
            let hash = proxy_common::maglev::hash_bytes(&addr::from_ip(address), settings.flow_seed());
            let want = pod_in_slot(&settings, family, hash);
            for port in [41_000, 41_001] {
                let client = SocketAddr::new(address, port);
                let out = bed.ingress(&frames::tcp_frame(client, family.nodeport(), SYN));
                assert_eq!(out.verdict, REDIRECT, "{client}");
                assert_eq!(frames::seen(&out.frame).dst, want, "{client}");
            }
        }
    });
}

#[test]
fn trace_names_a_maglev_pick_with_its_table_slot() {
    // Flow: client:40000 → node:30066 SYN at a Maglev nodePort ⇒ a `tc` line with pick
    // `maglev` and the slot of its 5-tuple's hash.
    for_each_family("maglev-trace", |bed, family| {
        let settings = maglev_service(bed, family, 0, 0);
        let wait = std::time::Duration::from_secs(5);
        let trace = Trace::start(env!("CARGO_BIN_EXE_agent").as_ref(), &bed.root, &[], wait).expect("trace");
        assert_eq!(bed.ingress(&frames::tcp_frame(family.client(), family.nodeport(), SYN)).verdict, REDIRECT);
        let lines = trace.collect(wait, |seen| !seen.is_empty());
        trace.stop(wait).expect("trace stops on SIGTERM");
        assert_eq!(lines.len(), 1, "{lines:#?}");
        let hash = flow_hash(&settings, family, family.client());
        let slot = proxy_common::maglev::slot(hash, settings.table_size);
        assert_eq!((lines[0]["pick"].as_str(), lines[0]["slot"].as_u64()), (Some("maglev"), Some(u64::from(slot))));
        assert_eq!(lines[0]["backend"], format!("{}/TCP", pod_in_slot(&settings, family, hash)));
    });
}

// ---------------------------------------------------------------------------------------------
// Mesh mode (`--bpf-lb-sock-hostns-only`): a pod's packets, arriving on a pod-facing interface
// ---------------------------------------------------------------------------------------------

/// A ClusterIP in the family.
fn cluster_ip(family: Family) -> SocketAddr {
    SocketAddr::new(family.pick(Ipv4Addr::new(10, 96, 0, 10), Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10)), 80)
}

/// A client pod (another pod than the backend) in the family.
fn client_pod(family: Family) -> SocketAddr {
    SocketAddr::new(
        family.pick(Ipv4Addr::new(10, 244, 1, 200), Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x200)),
        40000,
    )
}

/// The bed's interface made pod-facing, and the ClusterIP programmed with `backends`.
fn mesh_bed(bed: &mut Bed, family: Family, proto: u8, backends: Vec<Endpoint>) {
    let eth0 = std::collections::BTreeSet::from(["eth0".to_owned()]);
    bed.datapath.set_pod_interfaces(&eth0).expect("listing eth0 as pod-facing");
    let ip = entry(FrontendKind::ClusterIp, proto, SVC_F_CLUSTER_IP, backends);
    bed.service(cluster_ip(family), proto, &ip);
}

#[test]
fn a_pods_syn_to_a_cluster_ip_is_dnated_without_snat() {
    // Flow: pod:40000 → ClusterIP:80 SYN on a pod-facing interface  ⇒  pod:40000 → backend:80,
    // redirected, checksums right.
    for_each_family("mesh-syn", |bed, family| {
        mesh_bed(bed, family, TCP, vec![endpoint(family.pod(0).ip(), false)]);
        let out = bed.ingress(&frames::tcp_frame(client_pod(family), cluster_ip(family), SYN));
        assert_eq!(out.verdict, REDIRECT);
        let expected = frames::Seen { src: client_pod(family), dst: family.pod(TARGET_PORT), proto: TCP };
        assert_eq!(frames::seen(&out.frame), expected, "DNAT only");
        assert!(frames::ip_checksum_ok(&out.frame) && frames::frame_l4_checksum_ok(&out.frame), "checksums");
    });
}

#[test]
fn a_pods_syn_to_a_cluster_ip_without_endpoints_is_answered_with_a_reset() {
    // Flow: pod:40000 → ClusterIP:80 SYN (seq 1), no endpoint  ⇒  ClusterIP:80 → pod:40000
    // RST|ACK acking 2, sent back out (redirected); no_endpoint +1.
    for_each_family("mesh-rst", |bed, family| {
        mesh_bed(bed, family, TCP, Vec::new());
        let out = bed.ingress(&frames::tcp_frame(client_pod(family), cluster_ip(family), SYN));
        assert_eq!(out.verdict, REDIRECT);
        let expected = frames::Seen { src: cluster_ip(family), dst: client_pod(family), proto: TCP };
        assert_eq!(frames::seen(&out.frame), expected);
        let (_, segment) = frames::upper(&out.frame);
        assert_eq!(segment.len(), 20, "a bare TCP header");
        assert_eq!(segment[13], 0x14, "RST|ACK");
        assert_eq!(u32::from_be_bytes(segment[8..12].try_into().unwrap()), 2, "acks the SYN (seq 1)");
        assert!(frames::ip_checksum_ok(&out.frame) && frames::frame_l4_checksum_ok(&out.frame), "checksums");
        assert_eq!(bed.drops(), BTreeMap::from([(drop::name(drop::NO_ENDPOINT), 1)]));
    });
}

#[test]
fn a_pods_datagram_to_a_cluster_ip_without_endpoints_is_answered_with_port_unreachable() {
    // Flow: pod:40000 → ClusterIP:80 UDP, no endpoint  ⇒  ClusterIP → pod ICMP (ICMPv6) port
    // unreachable quoting the datagram's IP and UDP headers, redirected; no_endpoint +1.
    for_each_family("mesh-icmp", |bed, family| {
        mesh_bed(bed, family, UDP, Vec::new());
        let frame = frames::udp_frame(client_pod(family), cluster_ip(family), 1, b"hello");
        let out = bed.ingress(&frame);
        assert_eq!(out.verdict, REDIRECT);
        assert_eq!(frames::addresses(&out.frame), (cluster_ip(family).ip(), client_pod(family).ip()));
        let quoted_len = frames::ip_header(&frame).len() + 8;
        let quoted = &frame[14..14 + quoted_len];
        let (proto, message) = frames::upper(&out.frame);
        match (cluster_ip(family).ip(), client_pod(family).ip()) {
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                assert_eq!((proto, message[0], message[1]), (ICMPV6, 1, 4), "ICMPv6 port unreachable");
                assert!(frames::icmp6_checksum_ok(src, dst, message), "ICMPv6 checksum");
            }
            _ => {
                assert_eq!((proto, message[0], message[1]), (ICMP, ICMP_DEST_UNREACH, 3), "port unreachable");
                assert_eq!(frames::checksum(message), 0, "ICMP checksum");
                assert!(frames::ip_checksum_ok(&out.frame), "IPv4 checksum");
            }
        }
        assert_eq!(&message[8..], quoted, "the datagram's headers quoted");
        assert_eq!(bed.drops(), BTreeMap::from([(drop::name(drop::NO_ENDPOINT), 1)]));
    });
}

// ---------------------------------------------------------------------------------------------
// Direct server return (IPv4 only: IPv6 frontends stay SNATed)
// ---------------------------------------------------------------------------------------------

/// A frontend on another node (node-1 of the two-node bed), named by the option a DSR packet
/// carries: distinct from this bed's own address, so a reply's new source can only come from it.
const OTHER_NODE_PORT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(172, 18, 0, 3), 30099);

/// The IPv4 header of `frame`, options included, and the L4 segment behind it.
fn header_and_segment(frame: &[u8]) -> (&[u8], &[u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    (&frame[14..14 + ihl], &frame[14 + ihl..14 + total])
}

/// Whether both checksums of an IPv4 frame (options and all) are right, computed here.
fn checksums_ok(frame: &[u8]) -> bool {
    let (header, segment) = header_and_segment(frame);
    let (src, dst) = frames::addresses(frame);
    frames::checksum(header) == 0 && frames::l4_checksum_ok(src, dst, header[9], segment)
}

/// `frame` (IPv4, no options) with the 8 bytes `option` behind its fixed header, the header's
/// length, total length and checksum fixed.
fn with_option(frame: &[u8], option: [u8; 8]) -> Vec<u8> {
    let mut out = [&frame[..34], &option, &frame[34..]].concat();
    out[14] += 2;
    let total = u16::from_be_bytes([out[16], out[17]]) + 8;
    out[16..18].copy_from_slice(&total.to_be_bytes());
    out[24..26].copy_from_slice(&[0, 0]);
    let sum = frames::checksum(&out[14..42]);
    out[24..26].copy_from_slice(&sum.to_be_bytes());
    out
}

/// The option that names `frontend`: type 0x9a, length 8, port, address.
fn dsr_option(frontend: SocketAddrV4) -> [u8; 8] {
    let [p0, p1] = frontend.port().to_be_bytes();
    let [a, b, c, d] = frontend.ip().octets();
    [0x9a, 8, p0, p1, a, b, c, d]
}

fn dsr_service(bed: &mut Bed, proto: u8, pod: IpAddr, local: bool) {
    let web = entry(FrontendKind::NodePort, proto, SVC_F_NODE_PORT | SVC_F_DSR, vec![endpoint(pod, local)]);
    bed.service(nodeport(), proto, &web);
}

#[test]
fn a_dsr_syn_to_a_remote_pod_keeps_the_client_and_carries_the_frontend_in_an_option() {
    // Flow: client:40000 → node:30066 SYN ⇒ client:40000 → remote-pod:80 SYN with option
    // [0x9a, 8, 30066, node], redirected; then the ACK ⇒ the same translation, no option.
    with_bed("dsr-syn", |bed| {
        let remote = Family::V4.remote_pod();
        dsr_service(bed, TCP, remote, false);
        let out = bed.ingress(&frames::tcp_frame(CLIENT, nodeport(), SYN));
        assert_eq!(out.verdict, REDIRECT);
        let (header, segment) = header_and_segment(&out.frame);
        assert_eq!(header.len(), 28, "the header grew by the option");
        assert_eq!(header[20..], dsr_option(nodeport()), "the option names the frontend");
        let (src, dst) = frames::addresses(&out.frame);
        let port = |o: usize| u16::from_be_bytes([segment[o], segment[o + 1]]);
        let pod = SocketAddr::new(remote, TARGET_PORT);
        let seen = (SocketAddr::new(src, port(0)), SocketAddr::new(dst, port(2)));
        assert_eq!(seen, (CLIENT.into(), pod), "DNAT only: the client's address is kept");
        assert_eq!(segment.len(), frames::ip_payload(&frames::tcp_frame(CLIENT, nodeport(), SYN)).len());
        assert!(checksums_ok(&out.frame), "IPv4 checksum (option included) and TCP checksum");

        let ack = bed.ingress(&frames::tcp_frame(CLIENT, nodeport(), ACK));
        assert_eq!(ack.verdict, REDIRECT);
        assert_eq!(header_and_segment(&ack.frame).0.len(), 20, "only a SYN carries the option");
        assert_eq!(frames::seen(&ack.frame).dst, pod);
        assert!(checksums_ok(&ack.frame));
        assert_eq!(bed.drops(), BTreeMap::new());
    });
}

#[test]
fn a_dsr_syn_to_a_pod_on_a_node_without_dsr_is_snated_without_an_option() {
    // Flow: client:40000 → node:30066 SYN, the remote pod's node not taking DSR (no
    // `BACKEND_F_DSR`) ⇒ node:P → remote-pod:80 SYN, no option (nobody there would strip it).
    with_bed("dsr-fallback", |bed| {
        let remote = Family::V4.remote_pod();
        let backend = Endpoint { dsr: false, ..endpoint(remote, false) };
        let web = entry(FrontendKind::NodePort, TCP, SVC_F_NODE_PORT | SVC_F_DSR, vec![backend]);
        bed.service(nodeport(), TCP, &web);
        let out = bed.ingress(&frames::tcp_frame(CLIENT, nodeport(), SYN));
        assert_eq!(out.verdict, REDIRECT);
        assert_eq!(header_and_segment(&out.frame).0.len(), 20, "no option");
        let pod = SocketAddr::new(remote, TARGET_PORT);
        let seen = frames::seen(&out.frame);
        assert_eq!((seen.src.ip(), seen.dst), (IpAddr::from(NODE), pod), "DNAT to the pod, SNAT to the node");
        assert_eq!(seen.src.port(), snat_port(bed, pod, TCP), "the port the flow's reply entry holds");
        assert!(checksums_ok(&out.frame));
        assert_eq!(bed.drops(), BTreeMap::new());
    });
}

#[test]
fn a_dsr_flow_closes_at_the_clients_fin() {
    // Flow: client → node:30066 SYN, remote pod (DSR) ⇒ open; client → node:30066 FIN|ACK ⇒
    // both entries closing (the pod's FIN never passes this node: without this they would sit
    // in close-wait for an hour).
    with_bed("dsr-fin", |bed| {
        dsr_service(bed, TCP, Family::V4.remote_pod(), false);
        assert_eq!(bed.ingress(&frames::tcp_frame(CLIENT, nodeport(), SYN)).verdict, REDIRECT);
        assert_eq!(bed.ingress(&frames::tcp_frame(CLIENT, nodeport(), FIN | ACK)).verdict, REDIRECT);
        let flags: Vec<u16> = bed.conntrack().iter().filter_map(Result::ok).map(|(_, v)| v.flags).collect();
        assert_eq!(flags.len(), 2, "the flow's two entries: {flags:?}");
        for flags in flags {
            assert_ne!(flags & CT_F_DSR, 0, "a DSR flow: {flags:#x}");
            assert_ne!(flags & CT_F_CLOSING, 0, "closing: {flags:#x}");
        }
    });
}

#[test]
fn dsr_to_a_local_pod_keeps_the_client_without_an_option_and_udp_carries_it_in_every_datagram() {
    // Flow: client → node:30066 SYN, local pod ⇒ client → pod:80, no option;
    // client → node:30066 UDP twice, remote pod ⇒ both datagrams carry the option.
    with_bed("dsr-local-udp", |bed| {
        dsr_service(bed, TCP, POD.into(), true);
        let out = bed.ingress(&frames::tcp_frame(CLIENT, nodeport(), SYN));
        assert_eq!(out.verdict, REDIRECT);
        assert_eq!(header_and_segment(&out.frame).0.len(), 20, "no option to a local pod");
        assert_eq!(frames::seen(&out.frame).src, SocketAddr::from(CLIENT), "not SNATed");

        let remote = Family::V4.remote_pod();
        dsr_service(bed, UDP, remote, false);
        for id in [1, 2] {
            let out = bed.ingress(&frames::udp_frame(CLIENT, nodeport(), id, b"hello"));
            assert_eq!(out.verdict, REDIRECT, "datagram {id}");
            assert_eq!(header_and_segment(&out.frame).0[20..], dsr_option(nodeport()), "datagram {id}");
            assert!(checksums_ok(&out.frame), "datagram {id}");
        }
    });
}

#[test]
fn the_backends_node_learns_the_option_and_sends_the_reply_from_the_frontend() {
    // Flow: client:40000 → pod:80 SYN with option [30099, other node] ⇒ passed on unchanged;
    // pod:80 → client:40000 SYN-ACK ⇒ other-node:30099 → client:40000, redirected.
    with_bed("dsr-reply", |bed| {
        let pod = SocketAddrV4::new(POD, TARGET_PORT);
        let syn = with_option(&frames::tcp_frame(CLIENT, pod, SYN), dsr_option(OTHER_NODE_PORT));
        assert!(checksums_ok(&syn), "the hand-built frame is valid");
        let out = bed.ingress(&syn);
        assert_eq!((out.verdict, &out.frame), (PASS, &syn), "delivered as it came, option kept");

        let out = bed.ingress(&frames::tcp_frame(pod, CLIENT, SYN | ACK));
        assert_eq!(out.verdict, REDIRECT);
        let seen = frames::seen(&out.frame);
        assert_eq!((seen.src, seen.dst), (OTHER_NODE_PORT.into(), CLIENT.into()), "from the frontend");
        assert!(checksums_ok(&out.frame));
        assert_eq!(bed.drops(), BTreeMap::new());
    });
}

#[test]
fn a_syn_without_the_option_forgets_the_tuples_frontend() {
    // Flow: client → pod:80 SYN with option ⇒ learnt; the same tuple's SYN without it (a new
    // connection straight to the pod) ⇒ forgotten: the pod's SYN-ACK passes untranslated.
    with_bed("dsr-forget", |bed| {
        let pod = SocketAddrV4::new(POD, TARGET_PORT);
        let syn = frames::tcp_frame(CLIENT, pod, SYN);
        assert_eq!(bed.ingress(&with_option(&syn, dsr_option(OTHER_NODE_PORT))).verdict, PASS);
        assert_eq!(bed.ingress(&syn).verdict, PASS);
        let reply = frames::tcp_frame(pod, CLIENT, SYN | ACK);
        let out = bed.ingress(&reply);
        assert_eq!((out.verdict, &out.frame), (PASS, &reply), "the old frontend is forgotten");
    });
}

#[test]
fn another_ip_option_teaches_nothing() {
    // Flow: client → pod:80 SYN with Router Alert-like option ⇒ passed; the pod's SYN-ACK ⇒
    // passed untranslated.
    with_bed("dsr-other-option", |bed| {
        let pod = SocketAddrV4::new(POD, TARGET_PORT);
        let mut option = dsr_option(OTHER_NODE_PORT);
        option[0] = 0x94;
        let out = bed.ingress(&with_option(&frames::tcp_frame(CLIENT, pod, SYN), option));
        assert_eq!(out.verdict, PASS);
        let reply = frames::tcp_frame(pod, CLIENT, SYN | ACK);
        let out = bed.ingress(&reply);
        assert_eq!((out.verdict, &out.frame), (PASS, &reply));
    });
}
