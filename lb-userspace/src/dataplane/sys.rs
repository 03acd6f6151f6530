//! The raw `bpf(2)` calls aya 0.14 does not offer: batch lookups and updates of arrays,
//! and the tiny map-of-maps whose update waits for an RCU grace period. Everything else
//! goes through aya.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    inner: Option<&OwnedFd>,
) -> Result<OwnedFd> {
    #[repr(C)]
    #[derive(Default)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
    }
    let mut attr = CreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        inner_map_fd: inner.map(|f| f.as_raw_fd() as u32).unwrap_or(0),
        ..Default::default()
    };
    let fd = sys_bpf(BPF_MAP_CREATE, &mut attr).context("creating a map")?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `bpf(2)` with the attribute struct `attr`: its non-negative result, or the error.
pub fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<i64> {
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut A,
            std::mem::size_of::<A>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// `BPF_MAP_LOOKUP_BATCH` of array elements `base..base+len`.
pub fn lookup_batch<V: Copy + Default>(map: &OwnedFd, base: u32, len: u32) -> Result<Vec<V>> {
    let mut values = vec![V::default(); len as usize];
    let mut keys = vec![0u32; len as usize];
    let mut done = 0usize;
    // The batch cursor resumes after the key in `in_batch`.
    let mut cursor = base.wrapping_sub(1);
    while done < len as usize {
        let mut out = 0u32;
        let mut attr = BatchAttr {
            in_batch: if done == 0 && base == 0 {
                0
            } else {
                &cursor as *const u32 as u64
            },
            out_batch: &mut out as *mut u32 as u64,
            keys: keys[done..].as_mut_ptr() as u64,
            values: values[done..].as_mut_ptr() as u64,
            count: (len as usize - done) as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        if attr.count == 0 {
            r?;
            bail!("the map ended before element {}", base as usize + done);
        }
        done += attr.count as usize;
        cursor = out;
    }
    Ok(values)
}

/// `BPF_MAP_UPDATE_BATCH` of `u32` keys and `V` values (kernel 5.6+, arrays and hashes).
pub fn update_batch<V>(map: &OwnedFd, keys: &[u32], values: &[V]) -> Result<()> {
    assert_eq!(keys.len(), values.len());
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        // On success or partial progress the kernel reports how many it wrote.
        if attr.count == 0 {
            r?;
        }
        done += attr.count as usize;
    }
    Ok(())
}

/// `BPF_MAP_UPDATE_ELEM` of one element (for maps aya has no type for: map-of-maps).
pub fn update_elem<K, V>(map: &OwnedFd, key: &K, value: &V) -> Result<()> {
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as *const V as u64,
        flags: 0,
    };
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr)?;
    Ok(())
}
