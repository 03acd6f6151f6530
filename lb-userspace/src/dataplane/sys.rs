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
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

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

/// How many elements a batch call got through. The kernel writes `count` back when it
/// stops partway (and on success), but not when it refuses the call outright (bad flags,
/// bad map): then `count` is still what was asked, and the answer is none.
fn progress(r: &std::io::Result<i64>, asked: u32, count: u32) -> usize {
    match r {
        Err(_) if count == asked => 0,
        _ => count as usize,
    }
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
        let asked = (len as usize - done) as u32;
        let mut attr = BatchAttr {
            in_batch: if done == 0 && base == 0 {
                0
            } else {
                &cursor as *const u32 as u64
            },
            out_batch: &mut out as *mut u32 as u64,
            keys: keys[done..].as_mut_ptr() as u64,
            values: values[done..].as_mut_ptr() as u64,
            count: asked,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = progress(&r, asked, attr.count);
        if got == 0 {
            r?;
            bail!("the map ended before element {}", base as usize + done);
        }
        done += got;
        cursor = out;
    }
    Ok(values)
}

/// `BPF_MAP_UPDATE_BATCH` of `keys` and `values` (kernel 5.6+, arrays and hashes; the
/// kernel takes no per-element flags here but `BPF_F_LOCK`).
pub fn update_batch<K, V>(map: &OwnedFd, keys: &[K], values: &[V]) -> Result<()> {
    assert_eq!(keys.len(), values.len());
    let mut done = 0;
    while done < keys.len() {
        let asked = (keys.len() - done) as u32;
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: asked,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        let got = progress(&r, asked, attr.count);
        if got == 0 {
            r?;
            bail!("BPF_MAP_UPDATE_BATCH wrote nothing");
        }
        // Stopped partway: go on with the rest (a lasting error comes back with no progress).
        done += got;
    }
    Ok(())
}

/// The CPUs this process may run on (its affinity mask: a cpuset may narrow it).
pub fn allowed_cpus() -> Result<Vec<u32>> {
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as u32)
        .filter(|&c| unsafe { libc::CPU_ISSET(c as usize, &set) })
        .collect())
}

/// Run `f` on CPU `cpu` (the calling thread is pinned there for the call, then restored).
pub fn on_cpu<T>(cpu: u32, f: impl FnOnce() -> T) -> Result<T> {
    unsafe {
        let mut old: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old) != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut one);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) != 0 {
            bail!(
                "sched_setaffinity({cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
        let r = f();
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &old);
        Ok(r)
    }
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

/// Every (key, value) of a hash map, `chunk` at a time (`BPF_MAP_LOOKUP_BATCH`; the kernel's
/// batch token is a bucket index, and a bucket never holds more than `chunk` entries here).
pub fn dump_hash<K: Copy + Default, V: Copy + Default>(
    map: &OwnedFd,
    chunk: usize,
) -> Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    let (mut token, mut first) = (0u32, true);
    loop {
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match r {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH"),
        }
        token = next;
        first = false;
    }
}

/// Delete `keys` from a hash map (`BPF_MAP_DELETE_BATCH`); keys already gone are skipped.
/// Returns how many were deleted.
pub fn delete_keys<K>(map: &OwnedFd, keys: &[K]) -> Result<usize> {
    let mut deleted = 0;
    let mut done = 0;
    while done < keys.len() {
        let asked = (keys.len() - done) as u32;
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            count: asked,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = sys_bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        let got = progress(&r, asked, attr.count);
        deleted += got;
        done += got;
        match r {
            Ok(_) => {}
            // The key at `done` vanished since it was read (LRU eviction, the program
            // overwrote and we raced): skip it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => done += 1,
            Err(e) => return Err(e).context("BPF_MAP_DELETE_BATCH"),
        }
    }
    Ok(deleted)
}

/// `BPF_LINK_TYPE_XDP`
pub const LINK_XDP: u64 = 6;
/// `BPF_LINK_TYPE_TCX`
pub const LINK_TCX: u64 = 11;

/// The interface index an XDP link is attached to (`bpf_link_info.xdp.ifindex`; aya 0.14's
/// `LinkInfo` does not expose it).
pub fn xdp_link_ifindex(link: std::os::fd::BorrowedFd<'_>) -> Result<u32> {
    link_ifindex(link, LINK_XDP)
}

/// The interface index of an XDP or TCX link (`ifindex` is the first field of either's
/// part of `bpf_link_info`); fails if the link is of another type than `kind`.
pub fn link_ifindex(link: std::os::fd::BorrowedFd<'_>, kind: u64) -> Result<u32> {
    // struct bpf_link_info: type, id, prog_id, then a union at offset 16 whose `xdp` member
    // starts with `ifindex`.
    let mut info = [0u64; 16];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
    if info[0] & 0xffff_ffff != kind {
        bail!("not a link of type {kind}");
    }
    Ok((info[2] & 0xffff_ffff) as u32)
}

/// `BPF_OBJ_GET`: a new file descriptor for what is pinned at `path`.
pub fn obj_get(path: &std::path::Path) -> Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    #[repr(C)]
    struct GetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = GetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    let fd =
        sys_bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("opening {}", path.display()))?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
