//! Loading the object: maps reused from their pins or replaced (see [`super::layout`]), programs
//! loaded, the socket programs attached; and the swap that ends a layout upgrade.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType},
};
use proxy_common::maps::{self, LAYOUT_VERSION};
use tracing::info;

use super::{
    Datapath, DatapathError, LoadOptions, Unattached, ensure_bpffs, layout,
    links::{self, CGROUP_PROGRAMS, TC_EGRESS_PROGRAM, TC_PROGRAM},
    maps::AyaMaps,
};

/// The BPF object, built by build.rs from `proxy-ebpf`.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy"));

impl Datapath {
    /// Loads the object, reusing maps already pinned under the root (an earlier agent's), and
    /// attaches the programs, replacing an earlier agent's links only once the new ones are in.
    pub fn load(opts: &LoadOptions) -> Result<(Self, AyaMaps), DatapathError> {
        let root = &opts.bpf_root;
        let bpffs_error = |path: &Path| {
            let path = path.to_owned();
            move |source| DatapathError::Bpffs { path, source }
        };
        ensure_bpffs(root).map_err(bpffs_error(root))?;
        let links = root.join("links");
        fs::create_dir_all(&links).map_err(bpffs_error(&links))?;
        let sizes = opts.map_sizes();
        // Said at start, so that a refusal for lack of room later reads against known sizes.
        info!(?sizes, "map sizes, from the --*-map-size flags");
        // Pinned maps the new programs cannot share stay with the old programs until the swap
        // (the object is parsed for its maps' shapes only when there are pinned maps to compare
        // or maps to create).
        let pinned = layout::pinned(root).map_err(bpffs_error(root))?;
        let wanted = if pinned.is_some() || opts.preallocate {
            layout::wanted(OBJECT, &sizes, opts.preallocate).map_err(DatapathError::Upgrade)?
        } else {
            BTreeMap::new()
        };
        let replacing = match pinned {
            Some(version) => layout::to_replace(root, version, &wanted),
            None => Vec::new(),
        };
        if !replacing.is_empty() {
            let staging = layout::staging(root);
            layout::fresh_staging(root).map_err(bpffs_error(&staging))?;
            info!(from = pinned, to = LAYOUT_VERSION, maps = ?replacing, "replacing maps the new programs cannot share");
        }
        let pin_dir = |name: &str| if replacing.contains(&name) { layout::staging(root) } else { root.clone() };
        let pins: Vec<(&str, PathBuf)> = maps::ALL.iter().map(|m| (*m, pin_dir(m).join(m))).collect();
        if opts.preallocate {
            // The object's maps are not preallocated, and aya cannot change a map's flags at
            // load: the maps to preallocate are created and pinned here, and the loader takes
            // them from their pins like an earlier agent's.
            for (name, path) in
                pins.iter().filter(|(name, path)| layout::PREALLOCATABLE.contains(name) && !path.exists())
            {
                layout::create_pinned(path, name, &wanted[*name])
                    .map_err(|source| DatapathError::Map { name, source })?;
            }
        }
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, size) in &sizes {
            loader.map_max_entries(name, *size);
        }
        let mut ebpf = loader.load(OBJECT)?;
        for name in [TC_PROGRAM, TC_EGRESS_PROGRAM] {
            links::classifier(&mut ebpf, name)?.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        for &name in CGROUP_PROGRAMS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(ProgramError::UnexpectedProgramType)
                .and_then(TryInto::try_into)
                .map_err(|source| DatapathError::Program { name, source })?;
            program.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        let maps = AyaMaps::open(&mut ebpf, |name| pin_dir(name).join(name))?;
        let mut datapath = Self {
            ebpf,
            root: root.clone(),
            cgroup: opts.cgroup.clone(),
            interfaces: BTreeSet::new(),
            egress_interfaces: BTreeSet::new(),
            unattached: Unattached::default(),
            replacing,
            sock_hostns_only: opts.sock_hostns_only,
            pod_interfaces: BTreeSet::new(),
        };
        // Before any socket program is attached, so that no pod's connection is translated
        // under the flag.
        datapath.set_array(maps::SOCK_HOSTNS_ONLY, u32::from(opts.sock_hostns_only))?;
        if datapath.upgrading() {
            let staging = layout::staging(root);
            layout::carry(root, &staging, &datapath.replacing, false)
                .map_err(|e| DatapathError::Upgrade(e.to_string()))?;
            return Ok((datapath, maps));
        }
        for &name in CGROUP_PROGRAMS {
            datapath.attach_cgroup(name)?;
        }
        layout::record(root).map_err(bpffs_error(root))?;
        Ok((datapath, maps))
    }

    /// Whether this agent is replacing maps (see [`layout`]) and has not swapped yet: its
    /// programs are not attached, the old ones serve.
    pub fn upgrading(&self) -> bool {
        !self.replacing.is_empty()
    }

    /// Starts the end of an upgrade after the first full sync filled the new maps (see
    /// [`layout`]): the flows the old programs started meanwhile are carried over, and the new
    /// programs replace the old ones on the cgroup and on every interface the old TC program
    /// was on. What is left (waiting for the kernel to release the old links, carrying the last
    /// flows, the new maps taking the old pins) needs no `Datapath` and takes up to seconds:
    /// the returned [`Upgrade`] does it, off the sync loop and without this datapath's lock.
    /// `None` when not upgrading.
    pub fn finish_upgrade(&mut self) -> Result<Option<Upgrade>, DatapathError> {
        let replacing = std::mem::take(&mut self.replacing);
        if replacing.is_empty() {
            return Ok(None);
        }
        let upgrade =
            Upgrade { staging: layout::staging(&self.root), root: self.root.clone(), replacing, old_links: Vec::new() };
        // Flows the old programs started since the first carry, right before the swap.
        upgrade.carry()?;
        let links = self.root.join("links");
        let old_links = links::pinned_link_ids(&links);
        // The TC programs change hands without a flow ever meeting a program that lacks its
        // conntrack entries: the new programs go in front of the old ones on every interface,
        // dormant (every packet goes on to the old ones); then all wake at once (one map
        // write) and serve, handing each packet of a flow they do not know on to the old
        // programs behind them, which open none any more; the old flows are carried over, and
        // only then do the old programs go.
        self.set_array(maps::HANDOVER, maps::HANDOVER_DORMANT)?;
        let tc = [(TC_PROGRAM, TcAttachType::Ingress), (TC_EGRESS_PROGRAM, TcAttachType::Egress)];
        for (program, kind) in tc {
            // Every interface the old program is on, as its pins say.
            let prefix = format!("{program}-");
            let on: BTreeSet<String> = fs::read_dir(&links)
                .map_err(|source| DatapathError::Bpffs { path: links.clone(), source })?
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix(&prefix).map(str::to_owned))
                .filter(|name| !name.ends_with("_new"))
                .collect();
            self.attach_tc_staged(program, kind, &on)?;
        }
        self.set_array(maps::HANDOVER, maps::HANDOVER_TAKING_OVER)?;
        let carried = upgrade.carry()?;
        let promoted = links::promote_staged(&links)?;
        self.set_array(maps::HANDOVER, maps::HANDOVER_NONE)?;
        info!(links = promoted, flows = carried, "the new TC programs serve alone");
        for &name in CGROUP_PROGRAMS {
            self.attach_cgroup(name)?;
        }
        Ok(Some(Upgrade { old_links, ..upgrade }))
    }

    /// Writes index 0 of one of this object's own one-entry `u32` arrays: where the swap
    /// stands for the TC programs ([`maps::HANDOVER`]), or [`maps::SOCK_HOSTNS_ONLY`].
    fn set_array(&mut self, name: &'static str, value: u32) -> Result<(), DatapathError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::Map { name, source: aya::maps::MapError::InvalidName { name: name.into() } })?;
        let mut array =
            aya::maps::Array::<_, u32>::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        array.set(0, value, 0).map_err(|source| DatapathError::Map { name, source })
    }

    /// Makes the `pod_interfaces` map hold exactly `interfaces` (by index; one gone meanwhile
    /// is left out): the TC ingress program translates new flows from there as the socket
    /// path would. The agent calls it on every interface scan under
    /// `--bpf-lb-sock-hostns-only`; public for tests that run frames through the program.
    pub fn set_pod_interfaces(&mut self, interfaces: &BTreeSet<String>) -> Result<(), DatapathError> {
        let name = maps::POD_INTERFACES;
        let wanted: BTreeSet<u32> = interfaces.iter().filter_map(|i| crate::sys::net::interface_index(i)).collect();
        if wanted == self.pod_interfaces {
            return Ok(());
        }
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::Map { name, source: aya::maps::MapError::InvalidName { name: name.into() } })?;
        let mut pods =
            aya::maps::HashMap::<_, u32, u32>::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        for index in self.pod_interfaces.difference(&wanted) {
            // Already gone with its interface's index is fine: only its absence matters.
            let _ = pods.remove(index);
        }
        for index in &wanted {
            pods.insert(index, 1, 0).map_err(|source| DatapathError::Map { name, source })?;
        }
        self.pod_interfaces = wanted;
        Ok(())
    }

    /// The loaded TC program (for `BPF_PROG_TEST_RUN` measurements).
    pub fn tc_program(&self) -> Option<&SchedClassifier> {
        self.ebpf.program(TC_PROGRAM).and_then(|p| p.try_into().ok())
    }

    /// The bpffs root of this datapath.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// The rest of an upgrade once the new programs are attached (see [`Datapath::finish_upgrade`]).
#[derive(Debug)]
#[must_use = "the new maps take the old pins only in Upgrade::complete"]
pub struct Upgrade {
    root: PathBuf,
    staging: PathBuf,
    replacing: Vec<&'static str>,
    /// The old programs' links, replaced by the new ones.
    old_links: Vec<u32>,
}

impl Upgrade {
    fn carry(&self) -> Result<u64, DatapathError> {
        layout::carry(&self.root, &self.staging, &self.replacing, true)
            .map_err(|e| DatapathError::Upgrade(e.to_string()))
    }

    /// Waits (bounded) until the kernel has released the old links, carries the flows the old
    /// programs started in between, and gives the new maps the old pins. Blocks for up to
    /// seconds: call it on a thread of its own.
    pub fn complete(self) -> Result<(), DatapathError> {
        links::wait_for_release(&self.old_links);
        self.carry()?;
        layout::swap_pins(&self.root, &self.staging, &self.replacing)
            .map_err(|source| DatapathError::Bpffs { path: self.staging.clone(), source })?;
        info!(layout = LAYOUT_VERSION, "upgrade done: the new programs serve from the new maps");
        Ok(())
    }
}
