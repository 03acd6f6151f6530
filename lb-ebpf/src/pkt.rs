//! Bounds-checked packet access. Every read or write of packet memory goes through a
//! `check` of the exact range first, so the verifier sees a proven bound on each access.
//! Loads and stores are native-width (not byte-by-byte): x86's JIT and the verifier accept
//! unaligned packet access, and byte loops would double the cost of the packet path.
use aya_ebpf::programs::XdpContext;

/// Address of `off..off+n` in the packet, or `None` if the frame is shorter.
#[inline(always)]
pub fn check(ctx: &XdpContext, off: usize, n: usize) -> Option<usize> {
    let start = ctx.data();
    if start + off + n > ctx.data_end() {
        return None;
    }
    Some(start + off)
}

/// As [`check`], with `data` and `data_end` read afresh (volatile), so that LLVM cannot
/// drop the comparison as implied by an earlier one on another pointer: the verifier
/// tracks ranges per pointer and would not know.
#[inline(always)]
pub fn check_fresh(ctx: &XdpContext, off: usize, n: usize) -> Option<usize> {
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    };
    if start + off + n > end {
        return None;
    }
    Some(start + off)
}

#[inline(always)]
pub fn ld8(p: usize) -> u8 {
    unsafe { *(p as *const u8) }
}
#[inline(always)]
pub fn ld16(p: usize) -> u16 {
    unsafe { *(p as *const u16) }
}
#[inline(always)]
pub fn ld32(p: usize) -> u32 {
    unsafe { *(p as *const u32) }
}
/// An IPv6 address as four raw words.
#[inline(always)]
pub fn ld_addr6(p: usize) -> [u32; 4] {
    [ld32(p), ld32(p + 4), ld32(p + 8), ld32(p + 12)]
}
#[inline(always)]
pub fn st16(p: usize, v: u16) {
    unsafe { *(p as *mut u16) = v }
}
#[inline(always)]
pub fn st32(p: usize, v: u32) {
    unsafe { *(p as *mut u32) = v }
}

/// A MAC address as one 32-bit and one 16-bit word.
#[derive(Clone, Copy)]
pub struct Mac {
    pub hi: u32,
    pub lo: u16,
}

impl Mac {
    #[inline(always)]
    pub fn load(p: usize) -> Self {
        Mac {
            hi: ld32(p),
            lo: ld16(p + 4),
        }
    }
    #[inline(always)]
    pub fn from_bytes(b: &[u8; 6]) -> Self {
        Mac {
            hi: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            lo: u16::from_ne_bytes([b[4], b[5]]),
        }
    }
    #[inline(always)]
    pub fn is_zero(&self) -> bool {
        self.hi == 0 && self.lo == 0
    }
    #[inline(always)]
    pub fn store(&self, p: usize) {
        st32(p, self.hi);
        st16(p + 4, self.lo);
    }
}

/// Write an Ethernet header at `p` (checked for `l3` bytes): `dst`, `src`, and, when
/// `l3 == 18`, the 802.1Q tag `tag` before the ethertype `et`.
#[inline(always)]
pub fn write_eth(p: usize, l3: usize, dst: Mac, src: Mac, tag: u16, et: u16) {
    dst.store(p);
    src.store(p + 6);
    if l3 == 18 {
        st16(p + 12, ETH_P_8021Q);
        st16(p + 14, tag);
        st16(p + 16, et);
    } else {
        st16(p + 12, et);
    }
}

/// Raw (wire-order) ethertypes and bytes as native-endian words.
pub const ETH_P_IP: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
pub const ETH_P_8021Q: u16 = 0x8100u16.to_be();

/// Build a native-endian word from four wire bytes.
#[inline(always)]
pub const fn w(b0: u8, b1: u8, b2: u8, b3: u8) -> u32 {
    u32::from_ne_bytes([b0, b1, b2, b3])
}
