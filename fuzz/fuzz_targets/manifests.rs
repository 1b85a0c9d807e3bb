//! The manifest-directory parser on arbitrary file contents: `parse_into` must never panic
//! (a bad document is an error entry naming it, never a crash), and whatever it accepts goes on
//! through the model, which must not panic either.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_agent::{
    model::{self, NodeInfo},
    source::manifests::{Manifests, parse_into},
};

fuzz_target!(|data: &[u8]| {
    // Files are read as UTF-8 (`read_to_string`); anything else never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut out = Manifests::default();
    parse_into(&mut out, "fuzz.yaml", text);
    for (origin, error) in &out.errors {
        assert!(origin.starts_with("fuzz.yaml (document "), "an error names its document: {origin}");
        assert!(!error.is_empty(), "an error says what is wrong");
    }
    let node = out.nodes.iter().find_map(|n| {
        let name = n.object.metadata.name.as_deref()?;
        Some(NodeInfo::from_node(name, Some(&n.object), &[]))
    });
    let node = node.unwrap_or_else(|| NodeInfo { name: "node-1".into(), ..NodeInfo::default() });
    let desired = model::desired(out.services.iter().map(|s| &*s.object), out.slices.iter().map(|s| &*s.object), &node);
    for skip in &desired.skipped {
        assert!(!skip.object.is_empty() && !skip.field.is_empty(), "a skip names its object and field: {skip}");
    }
});
