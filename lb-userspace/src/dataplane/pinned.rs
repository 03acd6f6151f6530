//! What an earlier agent left pinned, compared with what this build and config want: adopt
//! it as it is, migrate it (other sizes or layouts), or refuse with what to do.
use std::{collections::BTreeMap, path::Path};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, Map, MapData};
use lb_common::layout::{self, MapLayout};

use super::maps::{Sizes, MAPS};

/// One pinned map as the kernel and `LAYOUT` describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pinned {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    pub layout: MapLayout,
}

/// The verdict on a pin directory.
#[derive(Debug)]
pub enum Pins {
    /// Nothing pinned: a fresh start.
    None,
    /// Every map pinned exactly as wanted: adopt them.
    Same,
    /// Pinned maps of other sizes or layouts (or missing ones): migrate. `pinned` describes
    /// what is there, `changes` says what differs, for the log.
    Differ {
        pinned: BTreeMap<&'static str, Pinned>,
        changes: Vec<String>,
    },
}

/// Key and value sizes of each map in the first release, which pinned no `LAYOUT`: a pin
/// directory without one must match these to be read as version 1.
const V1_SIZES: [(&str, u32, u32); 12] = [
    ("VIPS", 20, 16),
    ("VIP_ADDRS", 20, 4),
    ("VIP_FILTER", 4, 8),
    ("VIP_INFO", 4, 24),
    ("RINGS", 4, 8),
    ("BACKENDS", 4, 24),
    ("CONNS", 40, 8),
    ("CONFIG", 4, 44),
    ("STATS", 4, 8),
    ("VIP_STATS", 4, 24),
    ("BE_STATS", 4, 24),
    ("DECAP_STATS", 4, 8),
];

/// Can this build turn a pinned map of layout version `from` into its own?
fn convertible(name: &str, from: u32, to: u32) -> bool {
    // Rings and filters are rebuilt from the config, never copied: any older one will do.
    from == to
        || (from == 1 && to == 2 && matches!(name, "BACKENDS" | "CONNS" | "BE_STATS"))
        || (from < to && matches!(name, "RINGS" | "VIP_FILTER"))
}

/// Read what is pinned under `dir` and decide. Errors are refusals that name what differs
/// and what to do; nothing is changed either way.
pub fn inspect(dir: &Path, sizes: &Sizes) -> Result<Pins> {
    let sizes = sizes.normalized();
    let present: Vec<_> = MAPS.iter().filter(|m| dir.join(m.name).exists()).collect();
    if present.is_empty() {
        return Ok(Pins::None);
    }
    let layouts: Option<HashMap<MapData, [u8; 16], MapLayout>> = if dir.join("LAYOUT").exists() {
        let data = MapData::from_pin(dir.join("LAYOUT")).context("opening the pinned LAYOUT")?;
        Some(HashMap::try_from(Map::HashMap(data)).context("the pinned LAYOUT")?)
    } else {
        None
    };
    let mut pinned = BTreeMap::new();
    let mut changes = Vec::new();
    for spec in &MAPS {
        let path = dir.join(spec.name);
        if !path.exists() {
            if spec.name != "LAYOUT" || layouts.is_some() {
                changes.push(format!("{}: not pinned, created", spec.name));
            }
            continue;
        }
        let info = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?
            .info()?;
        let layout = match &layouts {
            Some(l) => l.get(&layout::key(spec.name), 0).ok().unwrap_or_default(),
            None => {
                // The first release: version 1, if the sizes say so.
                match V1_SIZES.iter().find(|(n, ..)| *n == spec.name) {
                    Some(&(_, k, v)) if (info.key_size(), info.value_size()) == (k, v) => {
                        MapLayout {
                            version: 1,
                            shape: 0,
                        }
                    }
                    _ => bail!(
                        "pinned map {} ({}-byte keys, {}-byte values) is from no build this one \
                         knows: `lb agent --stop` first (the connection table is lost)",
                        path.display(),
                        info.key_size(),
                        info.value_size()
                    ),
                }
            }
        };
        let p = Pinned {
            map_type: info.map_type()? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
            layout,
        };
        let (have, want) = (layout.version, spec.layout.version);
        if have > want {
            bail!(
                "pinned map {} has layout version {have}, newer than this build's {want}: run \
                 the build that pinned it, or `lb agent --stop` first (the connection table \
                 is lost)",
                path.display()
            );
        }
        if have == want && layouts.is_some() && layout.shape != spec.layout.shape {
            bail!(
                "pinned map {} has layout version {have} but another shape than this build's: \
                 a struct changed without a new layout version (a bug in this build); run the \
                 build that pinned it, or `lb agent --stop` first",
                path.display()
            );
        }
        if !convertible(spec.name, have, want) {
            bail!(
                "pinned map {} has layout version {have}, which this build cannot convert to \
                 {want}: `lb agent --stop` first (the connection table is lost)",
                path.display()
            );
        }
        if have != want {
            changes.push(format!("{}: layout v{have} -> v{want}", spec.name));
        } else if (p.key_size, p.value_size) != (spec.key_size, spec.value_size) {
            bail!(
                "pinned map {} has {}-byte keys and {}-byte values under layout version {have}, \
                 this build expects {} and {}: `lb agent --stop` first",
                path.display(),
                p.key_size,
                p.value_size,
                spec.key_size,
                spec.value_size
            );
        }
        let want_entries = sizes.entries(spec.capacity)?;
        if p.max_entries != want_entries {
            changes.push(format!(
                "{}: {} {} -> {} entries",
                spec.name,
                spec.capacity.field(),
                p.max_entries,
                want_entries
            ));
        }
        if (p.map_type, p.flags) != (spec.map_type, spec.flags) {
            changes.push(format!(
                "{}: type/flags {}/{:#x} -> {}/{:#x}",
                spec.name, p.map_type, p.flags, spec.map_type, spec.flags
            ));
        }
        pinned.insert(spec.name, p);
    }
    if changes.is_empty() {
        Ok(Pins::Same)
    } else {
        Ok(Pins::Differ { pinned, changes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pin directory that removes itself.
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            if let Ok(entries) = std::fs::read_dir(&self.0) {
                for e in entries.flatten() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    fn dir(what: &str) -> Dir {
        crate::agent::ensure_bpffs().unwrap();
        let d =
            std::path::PathBuf::from(format!("/sys/fs/bpf/lbtest-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    const SIZES: Sizes = Sizes {
        max_vips: 4,
        max_backends: 16,
        max_conns: 1024,
        ring_stride: 7,
    };

    #[test]
    fn a_pinned_map_of_an_unknown_layout_is_refused_not_adopted() {
        let d = dir("layout");
        // A connection table from no build we know: 16-byte values and no LAYOUT.
        let old = HashMap::<MapData, [u8; 40], [u8; 16]>::create(1024, 0).unwrap();
        old.pin(d.0.join("CONNS")).unwrap();
        let err = format!("{:#}", inspect(&d.0, &SIZES).unwrap_err());
        assert!(
            err.contains("CONNS") && err.contains("no build this one knows"),
            "{err}"
        );
    }

    #[test]
    fn nothing_pinned_is_a_fresh_start_and_what_this_build_pinned_is_adopted() {
        let d = dir("same");
        assert!(matches!(inspect(&d.0, &SIZES).unwrap(), Pins::None));
        drop(crate::dataplane::Dataplane::load_at(SIZES, &d.0).unwrap());
        assert!(matches!(inspect(&d.0, &SIZES).unwrap(), Pins::Same));
        let bigger = Sizes {
            max_conns: 2048,
            ..SIZES
        };
        match inspect(&d.0, &bigger).unwrap() {
            Pins::Differ { changes, .. } => {
                assert_eq!(changes, ["CONNS: agent.max_conns 1024 -> 2048 entries"])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_connection_table_size_the_kernel_rounds_is_adopted_not_migrated() {
        // Per-CPU LRU tables are rounded up to a multiple of the possible CPUs: 1023 is
        // one on no machine with more than one CPU.
        let d = dir("round");
        let odd = Sizes {
            max_conns: 1023,
            ..SIZES
        };
        let dp = crate::dataplane::Dataplane::load_at(odd, &d.0).unwrap();
        let cpus = aya::util::nr_cpus().unwrap() as u32;
        assert_eq!(dp.sizes.max_conns, 1023u32.div_ceil(cpus) * cpus);
        drop(dp);
        assert!(matches!(inspect(&d.0, &odd).unwrap(), Pins::Same));
    }

    #[test]
    fn a_layout_from_a_newer_build_or_a_changed_shape_is_refused() {
        let d = dir("newer");
        let mut dp = crate::dataplane::Dataplane::load_at(SIZES, &d.0).unwrap();
        let key = layout::key("VIPS");
        let ours = dp.layout.get(&key, 0).unwrap();
        let newer = MapLayout {
            version: ours.version + 1,
            ..ours
        };
        dp.layout.insert(key, newer, 0).unwrap();
        let err = format!("{:#}", inspect(&d.0, &SIZES).unwrap_err());
        assert!(
            err.contains("VIPS") && err.contains("newer than this build"),
            "{err}"
        );
        let reshaped = MapLayout {
            shape: ours.shape ^ 1,
            ..ours
        };
        dp.layout.insert(key, reshaped, 0).unwrap();
        let err = format!("{:#}", inspect(&d.0, &SIZES).unwrap_err());
        assert!(
            err.contains("VIPS") && err.contains("another shape"),
            "{err}"
        );
    }
}
