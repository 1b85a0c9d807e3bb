//! The writer against a recording store: the maps end up holding exactly what was programmed,
//! and replaying the recorded operations one at a time never shows a lookup a half-written
//! service.

use std::{
    cell::Cell,
    collections::{BTreeMap, BTreeSet, HashSet},
    net::Ipv4Addr,
    rc::Rc,
    time::Duration,
};

use proptest::{collection, option, prelude::*};
use proxy_common::{
    addr,
    backend::{BACKEND_F_LOCAL, BACKEND_F_TERMINATING, Backend, BackendId},
    proto::TCP,
    service::{
        SCOPE_EXTERNAL, SCOPE_INTERNAL, SERVICE_ID_LOCAL_SET, SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_EXT_LOCAL,
        SVC_F_INT_LOCAL, SVC_F_NODE_PORT, SVC_F_TWO_SCOPES, ServiceKey, ServiceValue,
    },
};

use super::{
    WriteStats, Writer, frontend_of, master_key,
    recorder::{Maps, Op, Recorder},
    slot_order,
};
use crate::model::{Endpoint, Frontend, FrontendEntry, FrontendKind, ServicePortName};

/// One scope of one frontend, its slots resolved to the backends they name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Scope {
    flags: u16,
    affinity_timeout: u32,
    /// One per slot, sorted.
    backends: Vec<Backend>,
}

/// Every (frontend, scope) the maps serve.
type View = BTreeMap<(Frontend, u8), Scope>;

/// Desired frontends, as the sync loop hands them to the writer.
type State = BTreeMap<Frontend, FrontendEntry>;

/// The maps read back through their masters, with the `services` keys no master reaches and
/// the backend ids no slot names.
fn read_back(maps: &Maps) -> (View, Vec<ServiceKey>, Vec<BackendId>) {
    let mut view = View::new();
    let mut reached = HashSet::new();
    let mut named = HashSet::new();
    for (key, master) in maps.services.iter().filter(|(key, _)| key.slot == 0) {
        reached.insert(*key);
        let mut backends = Vec::new();
        for slot in 1..=master.count {
            let slot_key = key.with_slot(slot);
            let id = maps.services[&slot_key].backend_id;
            reached.insert(slot_key);
            named.insert(id);
            backends.push(maps.backends[&id]);
        }
        backends.sort();
        let frontend = frontend_of(key);
        let scope = Scope { flags: master.flags, affinity_timeout: master.affinity_timeout, backends };
        view.insert((frontend, key.scope), scope);
    }
    let unreached = maps.services.keys().filter(|key| !reached.contains(*key)).copied().collect();
    let unnamed = maps.backends.keys().filter(|id| !named.contains(*id)).copied().collect();
    (view, unreached, unnamed)
}

/// What the maps must serve for `state`, worked out from the entries alone.
fn expected(state: &State) -> View {
    let mut view = View::new();
    for (frontend, entry) in state {
        let scope = |set: &[Endpoint]| Scope {
            flags: entry.flags,
            affinity_timeout: entry.affinity_timeout,
            backends: backends(set, frontend.proto),
        };
        view.insert((*frontend, SCOPE_EXTERNAL), scope(&entry.backends));
        if let Some(internal) = &entry.internal {
            view.insert((*frontend, SCOPE_INTERNAL), scope(internal));
        }
    }
    view
}

/// The distinct `backends` values of `set`, sorted.
fn backends(set: &[Endpoint], proto: u8) -> Vec<Backend> {
    let distinct: BTreeSet<Backend> = set
        .iter()
        .map(|e| {
            let local = if e.local { BACKEND_F_LOCAL } else { 0 };
            let terminating = if e.terminating { BACKEND_F_TERMINATING } else { 0 };
            Backend { address: addr::from_ip(e.address), port: e.port, proto, flags: local | terminating }
        })
        .collect();
    distinct.into_iter().collect()
}

/// Every master of a service port carries that port's one id, and no two ports share one; the
/// local-set bit marks exactly the node-local sets: the external scope under the Local policy
/// that applies to the frontend's kind, never the internal (cluster-wide) scope.
fn check_service_ids(maps: &Maps, state: &State, label: &str) {
    let mut ids: BTreeMap<&ServicePortName, BTreeSet<u32>> = BTreeMap::new();
    for (frontend, entry) in state {
        let master = master_key(frontend);
        let scopes = [Some(SCOPE_EXTERNAL), entry.internal.as_ref().map(|_| SCOPE_INTERNAL)];
        let policy = if entry.kind == FrontendKind::ClusterIp { SVC_F_INT_LOCAL } else { SVC_F_EXT_LOCAL };
        for scope in scopes.into_iter().flatten() {
            let id = maps.services[&master.with_scope(scope)].service_id;
            let local = scope == SCOPE_EXTERNAL && entry.flags & policy != 0;
            assert_eq!(id & SERVICE_ID_LOCAL_SET != 0, local, "{label}: {frontend:?} scope {scope}: id {id:#x}");
            ids.entry(&entry.service).or_default().insert(id & !SERVICE_ID_LOCAL_SET);
        }
    }
    let all: BTreeSet<u32> = ids.values().flatten().copied().collect();
    assert!(!all.contains(&0), "{label}: service id 0 in {ids:?}");
    assert!(ids.values().all(|set| set.len() == 1), "{label}: a service port with several ids: {ids:?}");
    assert_eq!(all.len(), ids.len(), "{label}: service ports sharing an id: {ids:?}");
}

/// `services` and `backends` operations in `ops`.
fn counts(ops: &[Op]) -> WriteStats {
    let services = ops.iter().filter(|op| op.is_service()).count();
    WriteStats { service_writes: services, backend_writes: ops.len() - services }
}

/// A writer over a recording store, and the kernel maps replayed from its operations so far.
struct Harness {
    label: String,
    writer: Writer<Recorder>,
    kernel: Maps,
    replayed: usize,
    /// Whether the maps may hold entries the writer did not program (before the sweep).
    leftovers: bool,
    last: State,
    /// The store's [`Recorder::full_after`].
    full_after: Rc<Cell<Option<usize>>>,
    /// Frontends whose master must be there after every operation (an earlier agent's, which
    /// serve traffic while this writer takes over).
    serving: Vec<Frontend>,
}

impl Harness {
    fn new(label: &str) -> Self {
        Self::over(label, Maps::default())
    }

    /// A writer started over maps an earlier agent left behind.
    fn over(label: &str, maps: Maps) -> Self {
        let leftovers = maps != Maps::default();
        let full_after = Rc::default();
        let store = Recorder { maps: maps.clone(), full_after: Rc::clone(&full_after), ..Recorder::default() };
        let writer = Writer::new(store);
        let last = State::new();
        Self {
            label: label.into(),
            writer,
            kernel: maps,
            replayed: 0,
            leftovers,
            last,
            full_after,
            serving: Vec::new(),
        }
    }

    /// Programs `state` as the sync loop does (removes what is gone, upserts the rest), then
    /// checks every new operation and the result. Returns the operations.
    fn program(&mut self, state: &State) -> Vec<Op> {
        let gone: Vec<Frontend> = self.writer.programmed().filter(|f| !state.contains_key(f)).copied().collect();
        let mut stats = WriteStats::default();
        for frontend in gone {
            stats += self.writer.remove(frontend).unwrap();
        }
        for (frontend, entry) in state {
            stats += self.writer.upsert(*frontend, entry).unwrap();
        }
        let ops = self.replay();
        assert_eq!(stats, counts(&ops), "{}: the stats count what was written", self.label);
        self.last = state.clone();
        self.check();
        ops
    }

    /// The first full sync is done: sweeps what the writer did not program.
    fn sweep(&mut self) -> Vec<Op> {
        let stats = self.writer.sweep().unwrap();
        let ops = self.replay();
        assert_eq!(stats, counts(&ops), "{}: the sweep's stats count what it wrote", self.label);
        self.leftovers = false;
        self.check();
        ops
    }

    /// The periodic check: puts back what differs from the last state. The maps may be half
    /// written when it starts (that is why it runs), so only the end is checked.
    fn restore(&mut self) -> WriteStats {
        let stats = self.writer.restore().unwrap();
        let ops = self.writer.store().ops[self.replayed..].to_vec();
        for op in &ops {
            self.kernel.apply(*op);
        }
        self.replayed += ops.len();
        assert_eq!(self.kernel, self.writer.store().maps, "{}: replay and store disagree", self.label);
        assert_eq!(stats, counts(&ops), "{}: the restore's stats count what it wrote", self.label);
        self.check();
        stats
    }

    /// Replays the operations recorded since the last call on the kernel maps, checking after
    /// every single one that no lookup can find a half-written service.
    fn replay(&mut self) -> Vec<Op> {
        let ops = self.writer.store().ops[self.replayed..].to_vec();
        for (i, op) in ops.iter().enumerate() {
            self.kernel.apply(*op);
            if let Some(problem) = self.kernel.half_written() {
                panic!("{}: after operation {} of {} ({op:?}): {problem}", self.label, i + 1, ops.len());
            }
            if let Some(gone) = self.serving.iter().find(|f| !self.kernel.services.contains_key(&master_key(f))) {
                panic!("{}: after operation {} of {} ({op:?}): {gone:?} is not served", self.label, i + 1, ops.len());
            }
        }
        self.replayed += ops.len();
        assert_eq!(self.kernel, self.writer.store().maps, "{}: replay and store disagree", self.label);
        ops
    }

    /// The maps serve exactly the last state (or, before the sweep, at least that).
    fn check(&self) {
        let label = &self.label;
        let state = &self.last;
        let (mut view, unreached, unnamed) = read_back(&self.kernel);
        let want = expected(state);
        if self.leftovers {
            view.retain(|key, _| want.contains_key(key));
        } else {
            assert!(unreached.is_empty(), "{label}: services entries no master reaches: {unreached:?}");
            assert!(unnamed.is_empty(), "{label}: backends no slot names: {unnamed:?}");
        }
        assert_eq!(view, want, "{label}: the maps serve what was programmed");
        check_service_ids(&self.kernel, state, label);
        assert_eq!(self.writer.frontends(), state.len(), "{label}: frontends");
    }
}

/// ClusterIP 10.96.0.`n`:80/TCP.
fn frontend(n: u8) -> Frontend {
    Frontend { address: Ipv4Addr::new(10, 96, 0, n).into(), port: 80, proto: TCP }
}

/// Endpoint `n`: a pod address of its own on port 8080; even ones are on this node.
fn endpoint(n: u32) -> Endpoint {
    let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + n);
    Endpoint { address: address.into(), port: 8080, local: n.is_multiple_of(2), terminating: false, dsr: false }
}

/// A ClusterIP entry of service port `default/<service>` with endpoints `ns`.
fn entry(service: &str, ns: impl IntoIterator<Item = u32>) -> FrontendEntry {
    FrontendEntry {
        service: ServicePortName { namespace: "default".into(), name: service.into(), port: String::new(), proto: TCP },
        kind: FrontendKind::ClusterIp,
        flags: SVC_F_CLUSTER_IP,
        affinity_timeout: 0,
        backends: endpoints(ns),
        internal: None,
        source_ranges: Vec::new(),
    }
}

fn endpoints(ns: impl IntoIterator<Item = u32>) -> Vec<Endpoint> {
    let mut set: Vec<Endpoint> = ns.into_iter().map(endpoint).collect();
    set.sort();
    set
}

/// `entry` as a nodePort under `externalTrafficPolicy: Local`, with a separate internal-scope
/// set (the model gives an external frontend two scopes only then).
fn with_internal(mut entry: FrontendEntry, ns: impl IntoIterator<Item = u32>) -> FrontendEntry {
    entry.internal = Some(endpoints(ns));
    entry.kind = FrontendKind::NodePort;
    entry.flags = (entry.flags & !SVC_F_CLUSTER_IP) | SVC_F_NODE_PORT | SVC_F_EXT_LOCAL | SVC_F_TWO_SCOPES;
    entry
}

fn with_affinity(mut entry: FrontendEntry) -> FrontendEntry {
    entry.affinity_timeout = 10_800;
    entry.flags |= SVC_F_AFFINITY;
    entry
}

fn state<const N: usize>(entries: [(Frontend, FrontendEntry); N]) -> State {
    entries.into_iter().collect()
}

#[test]
fn every_operation_leaves_whole_services() {
    let (a, b) = (frontend(10), frontend(11));
    let thousand = || 1..=1000;
    let cases: Vec<(&str, Vec<State>)> = vec![
        ("growing 2 → 3", vec![state([(a, entry("a", [1, 2]))]), state([(a, entry("a", [1, 2, 3]))])]),
        ("shrinking 3 → 1, keeping the last", vec![state([(a, entry("a", [1, 2, 3]))]), state([(a, entry("a", [3]))])]),
        (
            "shrinking 3 → 1, keeping the first",
            vec![state([(a, entry("a", [1, 2, 3]))]), state([(a, entry("a", [1]))])],
        ),
        ("replacing a middle endpoint", vec![state([(a, entry("a", [1, 2, 3]))]), state([(a, entry("a", [1, 4, 3]))])]),
        ("replacing every endpoint", vec![state([(a, entry("a", [1, 2, 3]))]), state([(a, entry("a", [4, 5]))])]),
        (
            "down to 0 endpoints and back",
            vec![state([(a, entry("a", [1, 2]))]), state([(a, entry("a", []))]), state([(a, entry("a", [3]))])],
        ),
        (
            "a 1000-endpoint service changes",
            vec![
                state([(a, entry("a", thousand()))]),
                state([(a, entry("a", thousand().filter(|&n| n != 500).chain([1001])))]),
                state([(a, entry("a", 2..=1000))]),
                state([(a, entry("a", 1..=10))]),
            ],
        ),
        (
            "the internal scope switched on, changed, then off",
            vec![
                state([(a, entry("a", [1, 2]))]),
                state([(a, with_internal(entry("a", [1, 2]), [2]))]),
                state([(a, with_internal(entry("a", [1, 2]), [2, 4, 6]))]),
                state([(a, entry("a", [1, 2]))]),
                state([(a, with_internal(entry("a", [1, 2]), []))]),
                state([(a, entry("a", [1, 2]))]),
            ],
        ),
        (
            "a frontend with an internal scope from the start",
            vec![
                state([(a, with_internal(entry("a", [1, 2, 3]), [2]))]),
                state([(a, with_internal(entry("a", [3]), [2]))]),
            ],
        ),
        (
            "two frontends of two services share backends",
            vec![
                state([(a, entry("a", [1, 2])), (b, entry("b", [2, 3]))]),
                state([(a, entry("a", [1])), (b, entry("b", [2, 3]))]),
                state([(b, entry("b", [2]))]),
                state([(a, entry("a", [2])), (b, entry("b", [2]))]),
            ],
        ),
        (
            "two frontends of one service port share its id",
            vec![state([(a, entry("a", [1, 2])), (b, entry("a", [1, 2]))]), state([(b, entry("a", [1]))])],
        ),
        (
            "affinity switched on",
            vec![state([(a, entry("a", [1, 2]))]), state([(a, with_affinity(entry("a", [1, 2])))])],
        ),
        ("an endpoint turns terminating", {
            let mut terminating = entry("a", [1, 2]);
            terminating.backends[1].terminating = true;
            vec![state([(a, entry("a", [1, 2]))]), state([(a, terminating)])]
        }),
    ];
    for (rule, mut steps) in cases {
        // Every scenario ends with everything removed.
        steps.push(State::new());
        let mut harness = Harness::new(rule);
        for step in &steps {
            harness.program(step);
        }
        assert_eq!(harness.kernel, Maps::default(), "{rule}: nothing is left");
    }
}

#[test]
fn one_endpoint_change_in_a_large_service_writes_a_few_entries() {
    let a = frontend(10);
    let thousand = || 1..=1000;
    let cases: [(&str, Vec<u32>); 5] = [
        ("one endpoint replaced", thousand().filter(|&n| n != 500).chain([1001]).collect()),
        ("one endpoint added", thousand().chain([1001]).collect()),
        ("one endpoint removed from the middle", thousand().filter(|&n| n != 500).collect()),
        ("the first endpoint removed", (2..=1000).collect()),
        ("the last endpoint removed", (1..=999).collect()),
    ];
    for (rule, after) in cases {
        let mut harness = Harness::new(rule);
        harness.program(&state([(a, entry("a", thousand()))]));
        let ops = harness.program(&state([(a, entry("a", after))]));
        let written = counts(&ops);
        assert!(written.service_writes <= 3 && written.backend_writes <= 2, "{rule}: wrote {written:?}: {ops:?}");
    }
}

#[test]
fn an_unchanged_upsert_writes_nothing() {
    let a = frontend(10);
    let cases = [
        ("plain", entry("a", [1, 2, 3])),
        ("no endpoints", entry("a", [])),
        ("two scopes", with_internal(entry("a", [1, 2, 3]), [2])),
        ("affinity", with_affinity(entry("a", [1]))),
    ];
    for (rule, entry) in cases {
        let mut harness = Harness::new(rule);
        harness.program(&state([(a, entry.clone())]));
        let stats = harness.writer.upsert(a, &entry).unwrap();
        assert_eq!(stats, WriteStats::default(), "{rule}");
        let ops = harness.replay();
        assert!(ops.is_empty(), "{rule}: {ops:?}");
    }
}

#[test]
fn slot_order_keeps_survivors_in_place() {
    // (rule, old order, wanted ids, new order)
    type Ids = &'static [BackendId];
    let cases: [(&str, Ids, Ids, Ids); 8] = [
        ("an added id takes the next slot", &[1, 2, 3], &[1, 2, 3, 4], &[1, 2, 3, 4]),
        ("a replaced id's slot goes to the new one", &[1, 2, 3], &[1, 3, 4], &[1, 4, 3]),
        ("a removed id's slot goes to the last survivor", &[1, 2, 3, 4], &[1, 3, 4], &[1, 4, 3]),
        ("removing the last id moves nothing", &[1, 2, 3], &[1, 2], &[1, 2]),
        ("the order of the wanted ids does not matter", &[1, 2, 3], &[3, 2, 1], &[1, 2, 3]),
        ("survivors beyond the new length fill holes in order", &[1, 2, 3, 4, 5], &[5, 1, 4], &[1, 4, 5]),
        ("from nothing: the wanted order", &[], &[7, 5, 6], &[7, 5, 6]),
        ("to nothing", &[1, 2, 3], &[], &[]),
    ];
    for (rule, old, wanted, want) in cases {
        assert_eq!(slot_order(old, wanted), want, "{rule}");
    }
}

#[test]
fn a_new_writer_takes_over_an_earlier_agents_maps() {
    let (a, stale) = (frontend(10), frontend(99));
    // An earlier agent served `a` over backends 7, 40 and 41 (41 also in its internal scope)
    // and `stale`, which is gone now, over 7 and 40.
    let mut maps = Maps::default();
    let backend = |n: u32| backends(&[endpoint(n)], TCP)[0];
    for (id, n) in [(7, 1), (40, 2), (41, 3)] {
        maps.backends.insert(id, backend(n));
    }
    let master = |f: Frontend| master_key(&f);
    let slot = |id| ServiceValue { backend_id: id, ..ServiceValue::default() };
    let value = |count, flags| ServiceValue { count, flags, service_id: 3, ..ServiceValue::default() };
    maps.services.insert(master(a), value(3, SVC_F_CLUSTER_IP | SVC_F_TWO_SCOPES));
    for (s, id) in [(1, 7), (2, 40), (3, 41)] {
        maps.services.insert(master(a).with_slot(s), slot(id));
    }
    maps.services.insert(master(a).with_scope(SCOPE_INTERNAL), value(1, SVC_F_CLUSTER_IP | SVC_F_TWO_SCOPES));
    maps.services.insert(master(a).with_scope(SCOPE_INTERNAL).with_slot(1), slot(41));
    maps.services.insert(master(stale), value(2, SVC_F_CLUSTER_IP));
    for (s, id) in [(1, 7), (2, 40)] {
        maps.services.insert(master(stale).with_slot(s), slot(id));
    }
    assert_eq!(maps.half_written(), None, "the earlier agent's maps are whole");

    let mut harness = Harness::over("takeover", maps);
    let ops = harness.program(&state([(a, entry("a", [2, 4]))]));
    let put: BTreeMap<BackendId, Backend> =
        ops.iter().filter_map(|op| if let Op::PutBackend(id, b) = op { Some((*id, *b)) } else { None }).collect();
    // Endpoint 2 was backend 40 before: it keeps that id (affinity and conntrack entries
    // name it), and its entry is there already; endpoint 4 is new and gets an id above every
    // id present.
    let named: BTreeSet<BackendId> =
        (1..=2).map(|slot| harness.kernel.services[&master(a).with_slot(slot)].backend_id).collect();
    assert!(named.contains(&40), "a surviving backend keeps its id: {named:?}");
    assert!(!put.contains_key(&40), "and its entry is not written again: {put:?}");
    let fresh: Vec<BackendId> = put.keys().copied().collect();
    assert_eq!(fresh.len(), 1, "{put:?}");
    assert!(named.contains(&fresh[0]) && fresh[0] > 41, "a new backend's id is above every id present: {fresh:?}");

    let swept = harness.sweep();
    let deleted: BTreeSet<BackendId> =
        swept.iter().filter_map(|op| if let Op::DeleteBackend(id) = op { Some(*id) } else { None }).collect();
    assert_eq!(deleted, BTreeSet::from([7, 41]), "the sweep deletes the backends nobody claimed");
    assert!(harness.kernel.services.keys().all(|key| key.address == addr::from_ip(a.address)), "`stale` is gone");
    let again = harness.sweep();
    assert!(again.is_empty(), "a second sweep finds nothing: {again:?}");
    harness.program(&State::new());
    assert_eq!(harness.kernel, Maps::default());
}

#[test]
fn restore_puts_back_entries_deleted_or_changed_under_the_writer() {
    let (a, b, foreign) = (frontend(10), frontend(11), frontend(99));
    let mut harness = Harness::new("restore");
    harness.program(&state([(a, with_internal(entry("a", [1, 2, 3]), [2])), (b, entry("b", [3, 4]))]));
    harness.sweep();
    assert_eq!(harness.restore(), WriteStats::default(), "maps as programmed: nothing is written");

    // Someone deletes and scribbles on entries (`bpftool map delete/update`).
    let master = |f: Frontend| master_key(&f);
    let slot = |backend_id| ServiceValue { backend_id, ..ServiceValue::default() };
    let maps = &mut harness.writer.store.maps;
    maps.services.remove(&master(a));
    maps.services.remove(&master(b).with_slot(2));
    maps.services.insert(master(a).with_scope(SCOPE_INTERNAL).with_slot(1), slot(999));
    let some_backend = *maps.backends.keys().min().unwrap();
    maps.backends.remove(&some_backend);
    maps.services.insert(master(foreign), ServiceValue { count: 1, ..ServiceValue::default() });
    maps.services.insert(master(foreign).with_slot(1), slot(12_345));
    maps.backends.insert(12_345, backends(&[endpoint(9)], TCP)[0]);
    harness.kernel = maps.clone();

    let stats = harness.restore();
    // Master of a, slot 2 of b, a's internal slot, the foreign master and slot.
    assert_eq!(stats.service_writes, 5, "{stats:?}");
    // The deleted backend back, the foreign one gone.
    assert_eq!(stats.backend_writes, 2, "{stats:?}");
    assert_eq!(harness.restore(), WriteStats::default(), "restored maps need nothing more");
}

#[test]
fn a_failed_write_is_repaired_by_the_next_upsert() {
    let a = frontend(10);
    let before = state([(a, with_internal(entry("a", [1, 2]), [2]))]);
    let after = state([(a, with_internal(entry("a", [2, 3, 4]), [3, 5]))]);
    let (ops, mut maps) = {
        let mut harness = Harness::new("nothing fails");
        harness.program(&before);
        let maps = harness.kernel.clone();
        (harness.program(&after), maps)
    };
    let needed = ops.len();
    // A full map fails inserts of new keys; replacing a value and deleting always go through.
    let inserts: Vec<usize> = (0..needed)
        .filter(|&i| {
            let new = match ops[i] {
                Op::PutService(key, _) => !maps.services.contains_key(&key),
                Op::PutBackend(id, _) => !maps.backends.contains_key(&id),
                Op::DeleteService(_) | Op::DeleteBackend(_) => false,
            };
            maps.apply(ops[i]);
            new
        })
        .collect();
    for done in inserts {
        let mut harness = Harness::new(&format!("the maps fill up after {done} of {needed} operations"));
        harness.program(&before);
        harness.full_after.set(Some(harness.writer.store().ops.len() + done));
        assert!(harness.writer.upsert(a, &after[&a]).is_err(), "{}: the upsert fails", harness.label);
        harness.replay();
        // The sync loop upserts the service again on its next change.
        harness.full_after.set(None);
        harness.program(&after);
        harness.program(&State::new());
        assert_eq!(harness.kernel, Maps::default(), "{}: nothing is left", harness.label);
    }
}

/// A random state over three frontends (two of them of one service port) and eight
/// endpoints, each frontend maybe absent, maybe with an internal scope or affinity.
fn arb_state() -> impl Strategy<Value = State> {
    let set = || collection::btree_set(1..=8u32, 0..6);
    let arb_entry = (set(), option::of(set()), any::<bool>());
    collection::vec(option::of(arb_entry), 3).prop_map(|frontends| {
        let mut state = State::new();
        for (i, chosen) in frontends.into_iter().enumerate() {
            let Some((external, internal, affinity)) = chosen else { continue };
            let mut entry = entry(if i < 2 { "a" } else { "b" }, external);
            if let Some(internal) = internal {
                entry = with_internal(entry, internal);
            }
            if affinity {
                entry = with_affinity(entry);
            }
            state.insert(frontend(10 + i as u8), entry);
        }
        state
    })
}

proptest! {
    // A failing case is printed, not saved next to the source.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_changes_never_show_a_half_written_service(steps in collection::vec(arb_state(), 1..10)) {
        let mut harness = Harness::new("random steps");
        for step in &steps {
            harness.program(step);
        }
        harness.program(&State::new());
        prop_assert_eq!(&harness.kernel, &Maps::default());
    }

    #[test]
    fn a_restarted_agent_takes_over_whole(
        before in collection::vec(arb_state(), 1..5),
        after in collection::vec(arb_state(), 1..5),
    ) {
        let mut first = Harness::new("first agent");
        for step in &before {
            first.program(step);
        }
        let mut second = Harness::over("restarted agent", first.kernel.clone());
        for (i, step) in after.iter().enumerate() {
            second.program(step);
            if i == 0 {
                second.sweep();
            }
        }
    }

    #[test]
    fn slot_order_is_a_permutation_keeping_survivors(
        old in collection::btree_set(1..=12u32, 0..10),
        wanted in collection::btree_set(1..=12u32, 0..10),
        shuffle in any::<u64>(),
    ) {
        // Some order for `old` other than sorted.
        let mut old: Vec<BackendId> = old.into_iter().collect();
        old.sort_by_key(|id| (u64::from(*id)).wrapping_mul(shuffle | 1).rotate_left(17));
        let wanted: Vec<BackendId> = wanted.into_iter().collect();
        let order = slot_order(&old, &wanted);
        let mut sorted = order.clone();
        sorted.sort();
        prop_assert_eq!(&sorted, &wanted, "a permutation of the wanted ids");
        for (i, id) in old.iter().enumerate() {
            if i < wanted.len() && wanted.contains(id) {
                prop_assert_eq!(order[i], *id, "survivor {} keeps slot {}", id, i + 1);
            }
        }
    }
}

impl Harness {
    /// Programs the new frontends of `state` in one batch (as a large sync does), then checks
    /// every operation and the result as [`Harness::program`] does, serving `state` less the
    /// frontends the batch refused. Returns the refused frontends.
    fn program_batched(&mut self, state: &State) -> BTreeSet<Frontend> {
        self.writer.begin_batch();
        let mut stats = WriteStats::default();
        for (frontend, entry) in state {
            stats += self.writer.upsert(*frontend, entry).unwrap();
        }
        let refused: BTreeSet<Frontend> = self.writer.end_batch().into_iter().map(|(f, _)| f).collect();
        // A refused frontend is taken away, as one write at a time would have.
        self.serving.retain(|f| !refused.contains(f));
        let ops = self.replay();
        if refused.is_empty() {
            assert_eq!(stats, counts(&ops), "{}: the stats count what was written", self.label);
        }
        self.last = state.iter().filter(|(f, _)| !refused.contains(f)).map(|(f, e)| (*f, e.clone())).collect();
        self.check();
        refused
    }
}

/// A few frontends sharing endpoints, one with two scopes and affinity, of two service ports.
fn batch_state() -> State {
    state([
        (frontend(10), entry("a", [1, 2, 3])),
        (frontend(11), with_affinity(with_internal(entry("a", [2, 4]), [3, 5, 6]))),
        (frontend(12), entry("b", 1..=12)),
        (frontend(13), entry("c", [7])),
    ])
}

/// A batch writes what one upsert at a time writes, in stage order (every backend before any
/// `services` entry, every slot before any master), and a lookup racing it never finds a
/// half-written service (the replay checks after every operation).
#[test]
fn a_batch_writes_the_same_maps_backends_then_slots_then_masters() {
    let state = batch_state();
    let mut one_at_a_time = Harness::new("one at a time");
    one_at_a_time.program(&state);
    let mut batched = Harness::new("batched");
    assert!(batched.program_batched(&state).is_empty(), "the recorder has room");
    assert_eq!(batched.kernel, one_at_a_time.kernel, "the same maps");
    let ops = &batched.writer.store().ops;
    let first_service = ops.iter().position(|op| op.is_service()).unwrap();
    assert!(ops[first_service..].iter().all(|op| op.is_service()), "backends first: {ops:?}");
    let first_master = ops.iter().position(|op| matches!(op, Op::PutService(k, _) if k.slot == 0)).unwrap();
    let slot_after_master = ops[first_master..].iter().any(|op| matches!(op, Op::PutService(k, _) if k.slot != 0));
    assert!(!slot_after_master, "every slot before the first master: {ops:?}");
    // Later changes go one at a time over what the batch wrote.
    let mut changed = state.clone();
    changed.insert(frontend(10), entry("a", [3, 8]));
    changed.remove(&frontend(13));
    batched.program(&changed);
    batched.program(&State::new());
    assert_eq!(batched.kernel, Maps::default(), "nothing is left");
}

/// A batch whose writes meet a full map, wherever that happens: the frontends that did not fit
/// are refused and absent, every other one is served whole, and no lookup racing the batch and
/// its redo finds a half-written service.
#[test]
fn a_batch_that_meets_a_full_map_refuses_what_does_not_fit_and_programs_the_rest() {
    let state = batch_state();
    let ops = {
        let mut harness = Harness::new("nothing fails");
        harness.program_batched(&state);
        harness.writer.store().ops.clone()
    };
    let puts = (0..ops.len()).filter(|&i| matches!(ops[i], Op::PutService(..) | Op::PutBackend(..)));
    for done in puts {
        let mut harness = Harness::new(&format!("the maps fill up after {done} of {} operations", ops.len()));
        harness.full_after.set(Some(done));
        let refused = harness.program_batched(&state);
        assert!(!refused.is_empty(), "{}: something is refused", harness.label);
        // Room again: the refused frontends are programmed on the next sync.
        harness.full_after.set(None);
        harness.program(&state);
        harness.program(&State::new());
        assert_eq!(harness.kernel, Maps::default(), "{}: nothing is left", harness.label);
    }
}

proptest! {
    /// Any state programmed in a batch leaves the maps one upsert at a time leaves.
    #[test]
    fn a_batch_leaves_what_single_writes_leave(state in arb_state()) {
        let mut one_at_a_time = Harness::new("one at a time");
        one_at_a_time.program(&state);
        let mut batched = Harness::new("batched");
        prop_assert!(batched.program_batched(&state).is_empty());
        prop_assert_eq!(&batched.kernel, &one_at_a_time.kernel);
    }
}

/// A batch larger than a chunk goes out chunk by chunk and still leaves what single writes
/// leave.
#[test]
fn a_batch_of_many_chunks_leaves_what_single_writes_leave() {
    let state: State = (0..2_500u32)
        .map(|i| {
            let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i);
            let frontend = Frontend { address: address.into(), port: 80, proto: TCP };
            (frontend, entry(&format!("s{}", i % 1_500), [i % 3_000, i + 1]))
        })
        .collect();
    let mut one_at_a_time = Writer::new(Recorder::default());
    let mut batched = Writer::new(Recorder::default());
    batched.begin_batch();
    for (frontend, entry) in &state {
        one_at_a_time.upsert(*frontend, entry).unwrap();
        batched.upsert(*frontend, entry).unwrap();
    }
    assert!(batched.end_batch().is_empty(), "the recorder has room");
    assert_eq!(batched.store().maps, one_at_a_time.store().maps);
    assert_eq!(batched.store().names, one_at_a_time.store().names);
    assert_eq!(batched.store().maps.half_written(), None);
}

/// After a restart, every frontend goes through the first sync's batch. A batch that meets a
/// full map must not undo the entries an earlier agent left for the frontends it adopts (those
/// serve traffic, and "restarts drop nothing"): whether they are unchanged or changed while no
/// agent ran, they are served after every single operation, wherever the map fills up.
#[test]
fn a_batch_that_meets_a_full_map_never_takes_away_an_adopted_frontend() {
    let (a, b, new) = (frontend(10), frontend(11), frontend(12));
    let before = state([(a, entry("a", [1, 2, 3])), (b, with_internal(entry("b", [2, 4]), [4]))]);
    let mut earlier = Harness::new("the earlier agent");
    earlier.program(&before);
    let cases = [
        ("unchanged", before.clone()),
        ("an endpoint added while no agent ran", state([(a, entry("a", [1, 2, 3, 5])), (b, before[&b].clone())])),
    ];
    for (case, mut now) in cases {
        now.insert(new, entry("new", 20..=30));
        let ops = {
            let mut harness = Harness::over(case, earlier.kernel.clone());
            harness.program_batched(&now);
            harness.writer.store().ops.clone()
        };
        for full_after in 0..ops.len() {
            let label = format!("{case}: the maps fill up after {full_after} of {} operations", ops.len());
            let mut harness = Harness::over(&label, earlier.kernel.clone());
            harness.serving = vec![a, b];
            harness.full_after.set(Some(full_after));
            let refused = harness.program_batched(&now);
            assert!(refused.contains(&new), "{label}: the new service is refused: {refused:?}");
        }
    }
}

impl Harness {
    /// One periodic check ([`Writer::check`]); whether it ended a round. The maps may be half
    /// written before it (that is why it runs), so only the store is followed.
    fn check_once(&mut self) -> bool {
        self.writer.check(Duration::ZERO).unwrap();
        let ops = self.writer.store().ops[self.replayed..].to_vec();
        ops.iter().for_each(|op| self.kernel.apply(*op));
        self.replayed += ops.len();
        self.writer.round_ended()
    }

    /// Checks until a round ends; how many checks it took.
    fn check_round(&mut self) -> usize {
        (1..=100).find(|_| self.check_once()).expect("a round ends within 100 checks")
    }
}

/// The periodic check reads the large maps a range at a time: wrong and foreign entries go as
/// their range is read, missing ones once a whole round was read undisturbed; a round the
/// writer wrote during leaves them to the next round.
#[test]
fn the_periodic_check_repairs_a_range_at_a_time_and_missing_entries_after_a_round() {
    let (a, b, foreign) = (frontend(10), frontend(11), frontend(99));
    let state = state([(a, with_internal(entry("a", [1, 2, 3]), [2])), (b, entry("b", [3, 4, 5, 6]))]);
    let mut clean = Harness::new("as programmed");
    clean.program(&state);
    let mut harness = Harness::new("ranged check");
    harness.program(&state);
    harness.sweep();
    harness.writer.store.read_max = Some(3);
    assert!(harness.check_round() > 1, "3 entries a check: a round takes several");
    assert_eq!(harness.writer.store().ops.len(), harness.replayed, "nothing to write");

    let master = |f: Frontend| master_key(&f);
    let slot = |backend_id| ServiceValue { backend_id, ..ServiceValue::default() };
    let maps = &mut harness.writer.store.maps;
    maps.services.remove(&master(a));
    maps.services.insert(master(b).with_slot(2), slot(999));
    maps.services.insert(master(foreign), ServiceValue { count: 1, ..ServiceValue::default() });
    maps.services.insert(master(foreign).with_slot(1), slot(12_345));
    maps.backends.insert(12_345, backends(&[endpoint(9)], TCP)[0]);
    harness.kernel = maps.clone();
    let checks = harness.check_round();
    assert!(checks > 1, "{checks}");
    assert_eq!(harness.writer.store().maps, clean.kernel, "every entry repaired after one round");

    // A sync writes during the next round (here an upsert that changes nothing): the master
    // deleted under it waits a round more.
    harness.writer.store.maps.services.remove(&master(b));
    harness.kernel = harness.writer.store().maps.clone();
    harness.check_once();
    harness.writer.upsert(a, &state[&a]).unwrap();
    harness.check_round();
    assert!(!harness.writer.store().maps.services.contains_key(&master(b)), "a disturbed round cannot count");
    harness.check_round();
    assert_eq!(harness.writer.store().maps, clean.kernel, "the next round puts it back");
}

/// `service_names` is read a range at a time too: a name changed under the agent is put back
/// when its range is read, a deleted one once the round has read them all.
#[test]
fn the_periodic_check_repairs_service_names_a_range_at_a_time() {
    let state: State = (10..16).map(|i| (frontend(i), entry(&format!("svc-{i}"), [u32::from(i)]))).collect();
    let mut harness = Harness::new("names by range");
    harness.program(&state);
    harness.sweep();
    let programmed = harness.writer.store().names.clone();
    assert_eq!(programmed.len(), 6, "a name per service port");
    harness.writer.store.read_max = Some(2);
    let (&changed, _) = programmed.iter().next().unwrap();
    let (&deleted, _) = programmed.iter().last().unwrap();
    let names = &mut harness.writer.store.names;
    names.get_mut(&changed).unwrap().name[0] ^= 0x20;
    names.remove(&deleted);
    assert!(!harness.check_once(), "2 entries a check: a round takes several");
    assert!(!harness.writer.store().names.contains_key(&deleted), "a missing name shows only at the round's end");
    harness.check_round();
    assert_eq!(harness.writer.store().names, programmed, "both repaired after one round");
}

/// A check reads range after range until its time budget is spent: with time to spare it
/// ends a round alone, whatever the range size, and repairs what it read.
#[test]
fn a_check_with_time_to_spare_reads_a_whole_round() {
    let (a, b) = (frontend(10), frontend(11));
    let state = state([(a, entry("a", [1, 2, 3])), (b, entry("b", [3, 4, 5, 6]))]);
    let mut clean = Harness::new("as programmed");
    clean.program(&state);
    let mut harness = Harness::new("one long check");
    harness.program(&state);
    harness.sweep();
    harness.writer.store.read_max = Some(2);
    harness.writer.store.maps.services.remove(&master_key(&a));
    harness.writer.store.maps.backends.insert(12_345, backends(&[endpoint(9)], TCP)[0]);
    harness.kernel = harness.writer.store().maps.clone();
    harness.writer.check(Duration::from_secs(600)).unwrap();
    assert!(harness.writer.round_ended(), "the round ended in one check");
    assert_eq!(harness.writer.store().maps, clean.kernel, "the missing master back, the foreign backend gone");
}
