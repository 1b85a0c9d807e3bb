//! Tables for people and JSON for scripts. Pure: views in, text out.

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use super::{
    Snapshot,
    explain::{Explanation, Origin, PathExplanation, Verdict},
    view::{AffinityView, BackendView, ConntrackView, FrontendView, ScopeView},
};

/// Backends listed per row of the services table; the rest are counted (`-o json` has all).
const BACKENDS_PER_ROW: usize = 8;

/// Pretty JSON with a trailing newline.
pub fn json<T: Serialize + ?Sized>(value: &T) -> String {
    // Views hold only strings, numbers, bools and lists: serializing cannot fail.
    serde_json::to_string_pretty(value).expect("views serialize") + "\n"
}

/// Left-aligned columns two spaces apart; the last column is not padded.
fn grid(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn or_dash(words: &[String]) -> String {
    if words.is_empty() { "-".to_owned() } else { words.join(", ") }
}

/// The TRAFFIC column: which traffic a scope serves, in one word or two.
fn traffic_short(scope: &ScopeView) -> &'static str {
    match scope.traffic {
        "all" => "all",
        "from this node" => "this node",
        _ => "outside",
    }
}

/// The BACKENDS cell of one scope.
fn backends_cell(frontend: &FrontendView, scope: &ScopeView) -> String {
    if scope.count == 0 {
        let dropped = scope.scope == "external" && frontend.two_scopes && frontend.external_traffic_policy == "Local";
        return if dropped { "none: dropped (no local endpoint)".into() } else { "none: refused".into() };
    }
    let mut cells: Vec<String> = scope
        .backends
        .iter()
        .take(BACKENDS_PER_ROW)
        .map(|slot| {
            let endpoint = slot.endpoint.clone().unwrap_or_else(|| format!("#{}?", slot.backend_id));
            let endpoint = if slot.terminating { format!("{endpoint}(terminating)") } else { endpoint };
            // A DSR frontend's backend on a node that does not take DSR is SNATed: said.
            if slot.lb_mode != frontend.lb_mode { format!("{endpoint}(snat)") } else { endpoint }
        })
        .collect();
    if scope.backends.len() > BACKENDS_PER_ROW {
        cells.push(format!("… +{} more", scope.backends.len() - BACKENDS_PER_ROW));
    }
    cells.join(" ")
}

/// `inspect services`.
pub fn services(frontends: &[FrontendView], root: &Path) -> String {
    if frontends.is_empty() {
        return format!("no service frontends in {}: the agent has programmed none\n", root.join("services").display());
    }
    let mut rows = Vec::new();
    for f in frontends {
        for (i, scope) in f.scopes.iter().enumerate() {
            let cells = if i == 0 {
                vec![
                    f.frontend.clone(),
                    f.service.clone().unwrap_or_else(|| format!("id {} (unnamed)", f.service_id)),
                    f.kinds.join(","),
                    or_dash(&f.policies),
                ]
            } else {
                vec![String::new(); 4]
            };
            let mut row = cells;
            row.push(traffic_short(scope).to_owned());
            row.push(backends_cell(f, scope));
            rows.push(row);
        }
    }
    let mut out = grid(&["FRONTEND", "SERVICE", "KIND", "POLICY", "TRAFFIC", "BACKENDS (slot order)"], &rows);
    for f in frontends {
        for problem in &f.problems {
            let _ = writeln!(out, "warning: {}: {problem}", f.frontend);
        }
    }
    out
}

/// `inspect backends`.
pub fn backends(backends: &[BackendView], root: &Path) -> String {
    if backends.is_empty() {
        return format!("no backends in {}\n", root.join("backends").display());
    }
    let rows: Vec<Vec<String>> = backends
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                b.endpoint.clone(),
                if b.local { "this node" } else { "other node" }.to_owned(),
                if b.terminating { "terminating" } else { "ready" }.to_owned(),
                if b.used_by.is_empty() { "(unused)".to_owned() } else { b.used_by.join(", ") },
            ]
        })
        .collect();
    grid(&["ID", "ENDPOINT", "NODE", "STATE", "USED BY"], &rows)
}

fn age(seconds: f64) -> String {
    format!("{seconds:.0}s")
}

/// `inspect affinity`.
pub fn affinity(entries: &[AffinityView], snapshot: &Snapshot) -> String {
    if snapshot.affinity.is_none() {
        return format!("no affinity map pinned under {}\n", snapshot.root.display());
    }
    if entries.is_empty() {
        return "no affinity entries: one appears when a client connects to a service with sessionAffinity \
                ClientIP\n"
            .to_owned();
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.client.clone(),
                e.service.clone().unwrap_or_else(|| format!("id {} (unnamed)", e.service_id)),
                e.backend.clone().unwrap_or_else(|| format!("#{} (gone)", e.backend_id)),
                age(e.age_seconds),
                e.timeout_seconds.map_or_else(|| "-".to_owned(), |t| format!("{t}s")),
                affinity_state(e),
            ]
        })
        .collect();
    let mut out = grid(&["CLIENT", "SERVICE", "BACKEND", "AGE", "TIMEOUT", "STATE"], &rows);
    if entries.iter().any(|e| e.path == "socket") {
        out.push_str(
            "netns entries come from the socket path, which keys affinity by the client's network namespace \
             (all its processes share one); address entries from the packet path\n",
        );
    }
    out
}

fn affinity_state(e: &AffinityView) -> String {
    if e.backend_left_service {
        return "fresh: sticks, though the backend left the service".to_owned();
    }
    e.state.words().to_owned()
}

fn origins(origins: &[Origin]) -> String {
    let words: Vec<&str> = origins.iter().map(|o| o.words()).collect();
    words.join(" and ")
}

fn percent(p: f64) -> String {
    format!("{:.1}%", p * 100.0)
}

fn path(out: &mut String, path: &PathExplanation, two_scopes: bool) {
    let set = match (two_scopes, path.scope) {
        (false, _) => "the only backend set, scope 0".to_owned(),
        (true, "internal") => "scope 1: the internal backend set".to_owned(),
        (true, _) => "scope 0: the external backend set".to_owned(),
    };
    let _ = writeln!(out, "\n{} ({set}):", capitalize(&origins(&path.origins)));
    for origin in &path.origins {
        let _ = writeln!(out, "  via   {}", origin.hook());
    }
    for reason in &path.reasons {
        let _ = writeln!(out, "  why   {reason}");
    }
    let _ = writeln!(out, "  → {}", path.summary);
    let count: usize = path.candidates.iter().map(|c| c.slots.len()).sum();
    for c in &path.candidates {
        let endpoint = c.endpoint.clone().unwrap_or_else(|| format!("backend #{} (missing!)", c.backend_id));
        let slots: Vec<String> = c.slots.iter().map(u16::to_string).collect();
        let mut tags = vec![format!("backend {}", c.backend_id), format!("slot {}", slots.join(","))];
        tags.push(if c.local { "this node" } else { "other node" }.to_owned());
        if path.lb_mode == Some("dsr") && c.lb_mode == Some("snat") {
            tags.push("snat: its node takes no DSR".to_owned());
        }
        if c.terminating {
            tags.push("terminating".to_owned());
        }
        let sticky = path.sticky_to.as_deref() == c.endpoint.as_deref() && path.sticky_to.is_some();
        let _ = writeln!(
            out,
            "    {:>6}  {endpoint:<22}  {}{}",
            percent(c.probability),
            tags.join(", "),
            if sticky { "  ← remembered" } else { "" }
        );
    }
    if count > 0 && path.sticky_to.is_some() {
        let _ = writeln!(out, "    (the odds apply once the affinity entry expires)");
    }
    if count > 0 && path.verdict == Verdict::Maglev {
        let _ = writeln!(out, "    (each backend's share of new flows over all clients: ⌊M/N⌋ or ⌈M/N⌉ table slots)");
    }
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().collect::<String>() + chars.as_str()).unwrap_or_default()
}

/// `explain`.
pub fn explanation(e: &Explanation) -> String {
    let mut out = format!("{} → {}\n", e.from, e.to);
    for fact in &e.client {
        let _ = writeln!(out, "client    {}: {fact}", e.from);
    }
    let Some(f) = &e.frontend else {
        let _ =
            writeln!(out, "not a service frontend: the datapath leaves it alone (it goes to {} as addressed)", e.to);
        for note in &e.notes {
            let _ = writeln!(out, "note: {note}");
        }
        return out;
    };
    let service = f.service.clone().unwrap_or_else(|| "an unnamed service".to_owned());
    let _ = writeln!(out, "frontend  {} {} of {service} (service id {})", f.kinds.join(","), f.frontend, f.service_id);
    let affinity = f
        .affinity_timeout_seconds
        .map_or_else(|| "no session affinity".to_owned(), |t| format!("sessionAffinity ClientIP ({t}s)"));
    let _ = writeln!(
        out,
        "policy    externalTrafficPolicy {}, internalTrafficPolicy {}, {affinity}{}",
        f.external_traffic_policy,
        f.internal_traffic_policy,
        if f.two_scopes { ", two backend sets" } else { "" }
    );
    for p in &e.paths {
        path(&mut out, p, f.two_scopes);
    }
    match &e.affinity {
        None => {
            let _ = writeln!(out, "\naffinity  none (sessionAffinity is not ClientIP)");
        }
        Some(a) => {
            let head = match a.timeout_seconds {
                Some(t) => format!("ClientIP, timeout {t}s"),
                None => "off: these entries are ignored".to_owned(),
            };
            let _ = writeln!(out, "\naffinity  {head}");
            match &a.by_address {
                Some(entry) => {
                    let _ = writeln!(out, "  by client address (packet path): {}", affinity_line(entry));
                }
                None => {
                    let _ = writeln!(out, "  by client address (packet path): no entry for {}", e.from);
                }
            }
            let _ =
                writeln!(out, "  by network namespace (socket path; all processes of a namespace share its entry):");
            if a.by_netns.is_empty() {
                let _ = writeln!(out, "    no entries for this service");
            }
            for entry in &a.by_netns {
                let mine = entry.netns.is_some() && a.client_netns.is_some() && entry.netns == a.client_netns;
                let _ = writeln!(
                    out,
                    "    {}{}",
                    affinity_line(entry),
                    if mine { format!("  ← {}'s namespace", e.from) } else { String::new() }
                );
            }
        }
    }
    for note in &e.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}

fn affinity_line(e: &AffinityView) -> String {
    let backend = e.backend.clone().unwrap_or_else(|| format!("backend #{} (gone)", e.backend_id));
    let client = if e.path == "socket" { format!("{} ", e.client) } else { String::new() };
    format!("{client}→ {backend}, last used {} ago: {}", age(e.age_seconds), affinity_state(e))
}

/// The `inspect conntrack` table.
pub fn conntrack(entries: &[ConntrackView], snapshot: &Snapshot) -> String {
    if snapshot.conntrack.is_none() {
        return format!("no conntrack map pinned under {}\n", snapshot.root.display());
    }
    if entries.is_empty() {
        return "no conntrack entries: flows appear when traffic from outside reaches a NodePort, an external IP \
                or a LoadBalancer IP\n"
            .to_owned();
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let mut state = Vec::new();
            if e.snat {
                state.push("snat");
            }
            if e.local {
                state.push("local");
            }
            if e.dsr {
                state.push("dsr");
            }
            if e.close_wait {
                state.push("close_wait");
            }
            if e.closing {
                state.push("closing");
            }
            if e.expired {
                state.push("expired");
            }
            vec![
                e.direction.to_owned(),
                e.proto.to_owned(),
                format!("{} → {}", e.from, e.to),
                format!("{} → {}", e.new_from, e.new_to),
                e.backend_id.to_string(),
                age(e.idle_seconds),
                if state.is_empty() { "-".to_owned() } else { state.join(",") },
            ]
        })
        .collect();
    grid(&["DIRECTION", "PROTO", "PACKET", "REWRITTEN TO", "BACKEND", "IDLE", "STATE"], &rows)
}
