#!/usr/bin/env python3
"""Golden vectors for tests/tests/golden.rs, computed from docs/dataplane.md and the
Maglev description in lb-userspace/src/maglev.rs, independently of the Rust code:
MurmurHash3 from the `mmh3` package (pip install mmh3), everything else written here.
Run it to print the Rust constants; the test holds the literals it printed."""
import ipaddress, struct
import mmh3

SEED = 0x1B5EED  # the default agent.hash_seed


def raw_words(b):
    return [int.from_bytes(b[i:i + 4], "little") for i in range(0, len(b), 4)]


def flow_bytes(src, dst, sport, dport, proto, affinity):
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if affinity:
        return s
    return s + d + struct.pack("!HH", sport, dport) + bytes([proto, 0, 0, 0])


def flow_hash(seed, *flow, affinity=False):
    return mmh3.hash(flow_bytes(*flow, affinity), seed, signed=False)


def entropy(src, sport):
    w = raw_words(ipaddress.ip_address(src).packed)
    s0, s3 = w[0], (w[3] if len(w) == 4 else 0)
    sp = int.from_bytes(struct.pack("!H", sport), "little")
    x = s3 ^ s0 ^ ((sp << 16) | sp)
    return (x ^ (((x >> 13) * 0x9E3779B1) & 0xFFFFFFFF)) & 0xFFFFFFFF


def outer_src4(prefix, e):
    net = ipaddress.ip_network(prefix)
    base = int.from_bytes(net.network_address.packed, "little")
    host = (0xFFFFFFFF >> net.prefixlen) if net.prefixlen < 32 else 0
    mask = int.from_bytes(host.to_bytes(4, "big"), "little")
    return ipaddress.IPv4Address(((base & ~mask) | (e & mask)).to_bytes(4, "little"))


def outer_src6(prefix, e):
    net = ipaddress.ip_network(prefix)
    b = bytearray(net.network_address.packed)
    bits = 128 - net.prefixlen
    host = (0xFFFFFFFF >> (32 - bits)) if bits else 0
    mask = int.from_bytes(host.to_bytes(4, "big"), "little")
    w3 = int.from_bytes(b[12:16], "little")
    b[12:16] = ((w3 & ~mask) | (e & mask)).to_bytes(4, "little")
    return ipaddress.IPv6Address(bytes(b))


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src, dst, proto, payload, tos=0, ident=0, df=False, ttl=64):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), ident, 0x4000 if df else 0,
                    ttl, proto, 0, ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return h[:10] + struct.pack("!H", csum(h)) + h[12:] + payload


def ipv6(src, dst, nh, payload, tc=0, label=0, hop=64):
    first = (6 << 28) | (tc << 20) | label
    return struct.pack("!IHBB16s16s", first, len(payload), nh, hop, ipaddress.ip_address(src).packed,
                       ipaddress.ip_address(dst).packed) + payload


def pseudo(src, dst, proto, length):
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if len(s) == 4:
        return s + d + struct.pack("!BBH", 0, proto, length)
    return s + d + struct.pack("!IxxxB", length, proto)


def tcp(src, dst, sport, dport, payload, flags=0x10):
    h = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 65535, 0, 0)
    c = csum(pseudo(src, dst, 6, len(h) + len(payload)) + h + payload)
    return h[:16] + struct.pack("!H", c) + h[18:] + payload


def udp(src, dst, sport, dport, payload):
    h = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    c = csum(pseudo(src, dst, 17, len(h) + len(payload)) + h + payload) or 0xFFFF
    return h[:6] + struct.pack("!H", c) + payload


def mac(s):
    return bytes.fromhex(s.replace(":", ""))


def eth(dst, src, et):
    return mac(dst) + mac(src) + struct.pack("!H", et)


LB_MAC, CLIENT_MAC = "02:00:00:00:00:01", "02:00:00:00:00:0c"
SRC4, SRC6 = "198.18.255.0/24", "2001:db8:ff::/112"
B4, B4_MAC = "198.18.20.11", "02:00:00:00:20:0b"
B6, B6_MAC = "2001:db8:20::11", "02:00:00:00:60:11"
C4, C6, CPORT = "198.18.0.10", "2001:db8:c::10", 40000


def inner4(vip, proto, dport):
    l4 = (tcp if proto == 6 else udp)(C4, vip, CPORT, dport, b"golden")
    return ipv4(C4, vip, proto, l4, tos=0x10, ident=0x1234, df=True, ttl=63)


def inner6(vip, proto, dport):
    l4 = (tcp if proto == 6 else udp)(C6, vip, CPORT, dport, b"golden")
    return ipv6(C6, vip, proto, l4, tc=0x20, label=0x12345, hop=63)


def gue_v0(outer6, inner_v4, second):
    """GUE variant 0 header of a stateless VIP (docs/dataplane.md, `lb`: forward): hlen (2
    words of private data in an IPv4 outer header, 5 in IPv6), inner protocol 4 / 41, two
    zero bytes; private data "LB", flags (GUE_F_SECOND = 1 with a secondary), 0, and the
    secondary's address in the outer family (zeros without one)."""
    addr = ipaddress.ip_address(second).packed if second else bytes(16 if outer6 else 4)
    assert len(addr) == (16 if outer6 else 4)
    return (bytes([5 if outer6 else 2, 4 if inner_v4 else 41, 0, 0]) + b"LB"
            + bytes([1 if second else 0, 0]) + addr)


def encap(inner, inner_v4, tos, client, backend, gue, be_mac, stateless=False, second=None,
          ttl=64, udp_csum=0):
    """`ttl` and `udp_csum` other than the LB's (64, 0) make the frame as it arrives at a
    backend through routers, for decap's vectors."""
    e = entropy(client, CPORT)
    payload = inner
    outer6 = ":" in backend
    if gue:
        sport = 0xC000 | (e & 0x3FFF)
        g = gue_v0(outer6, inner_v4, second) if stateless else b""
        payload = struct.pack("!HHHH", sport, 6080, 8 + len(g) + len(inner), udp_csum) + g + inner
        proto = 17
    else:
        proto = 4 if inner_v4 else 41
    if outer6:
        outer = ipv6(str(outer_src6(SRC6, e)), backend, proto, payload, tc=tos, label=e & 0xFFFFF,
                     hop=ttl)
        et = 0x86DD
    else:
        outer = ipv4(str(outer_src4(SRC4, e)), backend, proto, payload, tos=tos, ttl=ttl)
        et = 0x0800
    return eth(be_mac, LB_MAC, et) + outer


def redirect(frame, second, dmac=None, smac=None):
    """decap's second chance (docs/dataplane.md, "decap: the second chance") of a frame
    without VLAN tag: flags |= GUE_F_REDIRECTED (2); outer destination := the secondary;
    IPv4 (20-byte header only): TTL 64, header checksum recomputed, UDP checksum 0; IPv6:
    hop limit 64. Ethernet from the FIB (`dmac`, `smac`) or unchanged (through the stack)."""
    f = bytearray(frame)
    l3 = 14
    a = ipaddress.ip_address(second).packed
    if f[l3] >> 4 == 6:
        pd = l3 + 40 + 8 + 4
        assert f[pd:pd + 2] == b"LB" and f[pd + 4:pd + 20] == a
        f[pd + 2] |= 2
        f[l3 + 24:l3 + 40] = a
        f[l3 + 7] = 64
    else:
        assert f[l3] == 0x45
        pd = l3 + 20 + 8 + 4
        assert f[pd:pd + 2] == b"LB" and f[pd + 4:pd + 8] == a
        f[pd + 2] |= 2
        f[l3 + 16:l3 + 20] = a
        f[l3 + 8] = 64
        f[l3 + 10:l3 + 12] = b"\0\0"
        f[l3 + 10:l3 + 12] = struct.pack("!H", csum(bytes(f[l3:l3 + 20])))
        f[l3 + 26:l3 + 28] = b"\0\0"
    if dmac:
        f[0:6] = mac(dmac)
        f[6:12] = mac(smac)
    return bytes(f)


def frames():
    cases = []
    i = inner4("198.18.10.1", 6, 80)
    cases.append(("ipip_4in4", "198.18.10.1", 80, 6, "ipip", B4, eth(LB_MAC, CLIENT_MAC, 0x0800) + i,
                  encap(i, True, 0x10, C4, B4, False, B4_MAC)))
    i = inner6("2001:db8:10::1", 6, 80)
    cases.append(("ipip_6in6", "2001:db8:10::1", 80, 6, "ipip", B6, eth(LB_MAC, CLIENT_MAC, 0x86DD) + i,
                  encap(i, False, 0x20, C6, B6, False, B6_MAC)))
    i = inner4("198.18.10.2", 6, 80)
    cases.append(("ipip_4in6", "198.18.10.2", 80, 6, "ipip", B6, eth(LB_MAC, CLIENT_MAC, 0x0800) + i,
                  encap(i, True, 0x10, C4, B6, False, B6_MAC)))
    i = inner4("198.18.10.3", 17, 53)
    cases.append(("gue_4in4", "198.18.10.3", 53, 17, "gue", B4, eth(LB_MAC, CLIENT_MAC, 0x0800) + i,
                  encap(i, True, 0x10, C4, B4, True, B4_MAC)))
    i = inner6("2001:db8:10::3", 17, 53)
    cases.append(("gue_6in6", "2001:db8:10::3", 53, 17, "gue", B6, eth(LB_MAC, CLIENT_MAC, 0x86DD) + i,
                  encap(i, False, 0x20, C6, B6, True, B6_MAC)))
    i = inner4("198.18.10.4", 6, 80)
    cases.append(("l2dsr", "198.18.10.4", 80, 6, "l2dsr", B4, eth(LB_MAC, CLIENT_MAC, 0x0800) + i,
                  eth(B4_MAC, LB_MAC, 0x0800) + i))
    return cases


# Stateless VIPs: the primary (B4 / B6) and the secondary the ring slot carries.
S4, S6 = "198.18.20.12", "2001:db8:20::12"
# decap's FIB cases: the interface toward the secondaries and their neighbour entries; for
# XDP_TX, the route goes out the receiving interface, `lo` under BPF_PROG_TEST_RUN, whose
# MAC is all zeros.
FIB_DEV_MAC, S4_MAC, S6_MAC = "02:00:00:00:00:f0", "02:00:00:00:20:0c", "02:00:00:00:60:12"
LO_MAC = "00:00:00:00:00:00"


def stateless_frames():
    """(name, VIP, port, proto, primary, secondary, input, output) of `lb`."""
    cases = []
    i = inner4("198.18.10.5", 6, 80)
    cases.append(("stateless_4in4", "198.18.10.5", 80, 6, B4, S4, eth(LB_MAC, CLIENT_MAC, 0x0800) + i,
                  encap(i, True, 0x10, C4, B4, True, B4_MAC, stateless=True, second=S4)))
    i = inner6("2001:db8:10::5", 6, 80)
    cases.append(("stateless_6in6", "2001:db8:10::5", 80, 6, B6, S6, eth(LB_MAC, CLIENT_MAC, 0x86DD) + i,
                  encap(i, False, 0x20, C6, B6, True, B6_MAC, stateless=True, second=S6)))
    i = inner4("198.18.10.6", 6, 80)
    cases.append(("stateless_4in6_alone", "198.18.10.6", 80, 6, B6, None,
                  eth(LB_MAC, CLIENT_MAC, 0x0800) + i,
                  encap(i, True, 0x10, C4, B6, True, B6_MAC, stateless=True, second=None)))
    return cases


def redirect_frames():
    """(name, input, output through the stack, output with a FIB route to another interface,
    output with a route out the receiving one, output when the connection is this host's:
    decapsulated, Ethernet header kept) of `decap`: the
    stateless frames above as they reach the primary through routers (TTL / hop limit 61,
    a UDP checksum set), an ACK of no connection there."""
    cases = []
    i = inner4("198.18.10.5", 6, 80)
    inp = encap(i, True, 0x10, C4, B4, True, B4_MAC, stateless=True, second=S4, ttl=61,
                udp_csum=0x1234)
    cases.append(("redirect_v4", inp, redirect(inp, S4), redirect(inp, S4, S4_MAC, FIB_DEV_MAC),
                  redirect(inp, S4, S4_MAC, LO_MAC), eth(B4_MAC, LB_MAC, 0x0800) + i))
    i = inner6("2001:db8:10::5", 6, 80)
    inp = encap(i, False, 0x20, C6, B6, True, B6_MAC, stateless=True, second=S6, ttl=61,
                udp_csum=0x1234)
    cases.append(("redirect_v6", inp, redirect(inp, S6), redirect(inp, S6, S6_MAC, FIB_DEV_MAC),
                  redirect(inp, S6, S6_MAC, LO_MAC), eth(B6_MAC, LB_MAC, 0x86DD) + i))
    return cases


def maglev(seed, backends, m):
    """backends: [(name, weight)]. Offsets/skips from FNV-1a-64 over domain byte, seed
    (little-endian) and name, finished with fmix64; Hamilton quotas; turns by (2k+1)/(2w),
    ties to name order; each turn takes the backend's next preferred empty slot."""
    def fnv(domain, name):
        h = 0xCBF29CE484222325
        for b in bytes([domain]) + seed.to_bytes(4, "little") + name:
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 33
        h = (h * 0xFF51AFD7ED558CCD) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 33
        h = (h * 0xC4CEB9FE1A85EC53) & 0xFFFFFFFFFFFFFFFF
        return h ^ (h >> 33)
    bs = sorted(backends)
    w = [x[1] for x in bs]
    total = sum(w)
    quota = [m * x // total for x in w]
    rem = [m * x % total for x in w]
    for i in sorted(range(len(w)), key=lambda i: (-rem[i], i))[: m - sum(quota)]:
        quota[i] += 1
    from fractions import Fraction
    turns = sorted(((Fraction(2 * k + 1, 2 * w[p]), p) for p in range(len(w)) for k in range(quota[p])))
    nxt = [fnv(1, n.encode()) % m for n, _ in bs]
    skip = [fnv(2, n.encode()) % (m - 1) + 1 for n, _ in bs]
    table = [None] * m
    for _, p in turns:
        c = nxt[p]
        while table[c] is not None:
            c = (c + skip[p]) % m
        table[c] = bs[p][0]
        nxt[p] = (c + skip[p]) % m
    return table


def main():
    flows = {
        "V4_TCP": (C4, "198.18.10.1", CPORT, 80, 6),
        "V6_UDP": (C6, "2001:db8:10::3", CPORT, 53, 17),
    }
    for name, f in flows.items():
        h = flow_hash(SEED, *f)
        ha = flow_hash(SEED, *f, affinity=True)
        e = entropy(f[0], f[2])
        print(f"// {name}: {f}")
        print(f"const {name}_HASH: u32 = {h:#010x};")
        print(f"const {name}_HASH_AFFINITY: u32 = {ha:#010x};")
        print(f"const {name}_SLOT_65537: u32 = {h % 65537};")
        print(f"const {name}_ENTROPY: u32 = {e:#010x};")
        if ":" in f[0]:
            print(f'const {name}_OUTER_SRC: &str = "{outer_src6(SRC6, e)}";')
            print(f"const {name}_FLOW_LABEL: u32 = {e & 0xFFFFF:#07x};")
        else:
            print(f'const {name}_OUTER_SRC: &str = "{outer_src4(SRC4, e)}";')
        print(f"const {name}_GUE_SPORT: u16 = {0xC000 | (e & 0x3FFF)};")
    t = maglev(SEED, [("198.18.20.11", 1), ("198.18.20.12", 2), ("198.18.20.13", 3)], 13)
    print("const MAGLEV_13: [&str; 13] = [" + ", ".join(f'"{x}"' for x in t) + "];")
    for name, vip, port, proto, fwd, be, inp, out in frames():
        print(f"// {name}: VIP {vip}:{port}/{proto} {fwd} -> {be}")
        print(f'const IN_{name.upper()}: &str = "{inp.hex()}";')
        print(f'const OUT_{name.upper()}: &str = "{out.hex()}";')
    for name, vip, port, proto, be, second, inp, out in stateless_frames():
        print(f"// {name}: stateless VIP {vip}:{port}/{proto} gue -> {be}, secondary {second}")
        print(f'const IN_{name.upper()}: &str = "{inp.hex()}";')
        print(f'const OUT_{name.upper()}: &str = "{out.hex()}";')
    for name, inp, stack, fib, tx, local in redirect_frames():
        print(f"// {name}: decap's second chance: to the stack / a FIB route via fib0 / via lo;")
        print("// or decapsulated when this host has the connection")
        print(f'const IN_{name.upper()}: &str = "{inp.hex()}";')
        print(f'const OUT_{name.upper()}_STACK: &str = "{stack.hex()}";')
        print(f'const OUT_{name.upper()}_FIB: &str = "{fib.hex()}";')
        print(f'const OUT_{name.upper()}_TX: &str = "{tx.hex()}";')
        print(f'const OUT_{name.upper()}_LOCAL: &str = "{local.hex()}";')


if __name__ == "__main__":
    main()
