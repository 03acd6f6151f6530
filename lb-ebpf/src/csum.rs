//! Internet checksums (RFC 1071). Words are summed in native order: the one's-complement
//! sum is byte-order independent, so storing the folded result natively gives the right bytes.

#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// RFC 1624 eqn. 3: the checksum `hc` after one 16-bit word changed from `m` to `m2`.
#[inline(always)]
pub fn replace(hc: u16, m: u16, m2: u16) -> u16 {
    fold((!hc) as u64 + (!m) as u64 + m2 as u64)
}
