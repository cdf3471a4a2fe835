#!/usr/bin/env python3
"""Write the hand-made seed inputs of fuzz/corpus/ioas_sequence/.

Each seed is a small program in the ioas_sequence_fuzzer encoding (see the
comment at the top of ioas_sequence_fuzzer.cpp): a 4-byte header, then one
opcode byte per operation followed by its argument bytes. Run it from
anywhere; it rewrites only the seeds it names (seed-*). Add a seed by adding
an entry to SEEDS.
"""
import os

# Opcodes (enum Op in ioas_sequence/operations.hpp).
MAP, UNMAP, COPY, ATTACH, DETACH, DOMAIN, ACCESS, ACCESS_DESTROY, PIN, UNPIN, RW, DMA, \
    TRANSLATE, ALLOWED, RESERVED, RECREATE, LIMIT, FAULTS, DIRTY, PIN_PAGES, UNPIN_PAGES, \
    LIVE, ROUND = range(23)
# PIN_PAGES' and UNPIN_PAGES' flag byte: bit 0 aligns the IOVA down; 6 (both
# bits) passes no host array to PIN_PAGES. UNPIN_PAGES with a flag byte
# below 0x80 unpins from the (byte % n)-th held page, 1 + next byte % 4 pages.
PAGES_ALIGN, PAGES_NULL_HOST = 1, 6
TOO_MANY_PAGES = 0xFF
# LIVE's mode byte: INVALIDATE (then an IOVA and a length), or replace_host of
# the mapping at an IOVA with the same source, a same-length slice of the
# read-write memfd (then an offset pick) or any source.
INVALIDATE, REPLACE_SAME, REPLACE_FILE_SLICE, REPLACE_SOURCE = 0, 1, 3, 5
# DIRTY's mode byte: action (low 2 bits) and flags for the reads.
DIRTY_ON, DIRTY_OFF, DIRTY_READ, DIRTY_PEEK = range(4)
ALIGN_IOVA, ROUND_LEN, SHORT_BITMAP = 4, 8, 16

# Value picks: an index into the length table, or 16 + a number of pages.
def pages(n):
    return 16 + n
LEN0, LEN1, LEN_FFF, LEN_4K, LEN_4K1, LEN_8K, LEN_12K, LEN_32K, LEN_64K, LEN_256K, LEN_1M, \
    LEN_2M, LEN_1G, LEN_2_47, LEN_MAX, LEN_MAX_FFF = range(16)
# IOVA picks: an index into the IOVA table, or 20 + a number of pages.
IOVA_0, IOVA_1, IOVA_800, IOVA_4K, IOVA_8K, IOVA_64K, IOVA_1M, IOVA_2M, IOVA_4M, IOVA_16M, \
    IOVA_FEE, IOVA_2_39_4K, IOVA_2_47, IOVA_2_48_4K, IOVA_2_48, IOVA_MAX, IOVA_MAX_FFF, \
    IOVA_MAX_1FFF, IOVA_MAX_1, IOVA_MAX_1000 = range(20)
def area(i, delta=0):
    """IOVA relative to the i-th mapping: delta 0 start, 1 +4K, 2 middle,
    3 last page, 4 end, 5 start-4K, 6 +1, 7 last byte."""
    return [0xC0 + i, delta]
def to_end(k=0):
    """Length from the IOVA to the end of the k-th mapping from there."""
    return 0xE0 + k

# Sources: kind byte then arguments.
def file_rw(off, length):
    return [0, off, length]
def file_ro(off, length):
    return [1, off, length]
def simulated(which, off, length):
    return [2 + (which & 1) * 6, off, length]  # kind % 6 == 2
def user_rw(off, length):
    return [3, off, length]
def user_ro_flag(off, length):
    return [4, off, length]  # writable=false source
def user_unmapped(straddle, length):
    return [5, 0 if straddle else 1, length]  # 0: last read-only page, 1: first PROT_NONE page

R, W, RW_ = 1, 2, 3
FIXED = 4

def hdr(io0=0, io1=0, limit_proc=0, limit_user=0):
    # io byte: mode = b % 3 (per_process, per_user, none); max_mappings = (b/3) % 4
    # limits: index into (unset, 0, 16K, 256K, 1M, 4M)
    return [io0, io1, limit_proc, limit_user]

def op(code, *args):
    out = [code]
    for a in args:
        out += a if isinstance(a, list) else [a]
    return out

# A raw 64-bit IOVA (pick byte 0xff, then the value, little-endian).
def raw(v):
    return [0xFF] + list(v.to_bytes(8, "little"))

# Concurrent rounds (ioas_sequence/concurrent.hpp). Lane t works in the IOVA
# window WINDOW + t * 2 MiB; the conflicting pairs in SHARED.
WINDOW, SHARED = 0x1200000, 0x1800000
# ROUND flags: IOAS slot 1, three lanes (else two), an access per lane, its
# callback refusing every other notification, probing the unmapped range.
R_IOAS1, R_THREE, R_ACCESS, R_REFUSE, R_PROBE = 1, 2, 4, 8, 16
# Conflicting pairs (lanes 0 and 1, at one slot).
K_NONE, K_UNMAP_PIN, K_MAP_UNMAP, K_MAP_MAP, K_WRITE_DIRTY, K_UNMAP_RW, K_UNMAP_UNMAP = range(7)
# Lane operations, 5 bytes each. Lane IOVA byte: below 0xc0 an 8 KiB step
# into the window, AREA + k the k-th area of the window. Page counts index
# (1, 2, 3, 4, 8, 16, 32, 64); TO_END (unmap) to the end of the area.
L_MAP, L_UNMAP, L_PIN, L_UNPIN, L_RW, L_DMA, L_DIRTY = range(7)
AREA, TO_END = 0xC0, 0xE0
NP1, NP2, NP3, NP4, NP8, NP16, NP32, NP64 = range(8)
# Lane map memory: its memfd slice, simulated slice, user rw slice (from a
# page), read-only user memory (writable source), PROT_NONE user memory.
LS_FILE, LS_SIM, LS_USER, LS_USER_RO, LS_USER_NONE = range(5)
def lsrc(kind, page=0):
    return kind | (page << 3)
# Lane rw/DMA lengths: 1, 0xfff, 4K, 4K+1, 12K, 64K, 8K, 0x7ff; TO_END.
LL1, LL_FFF, LL4K, LL4K1, LL12K, LL64K, LL8K, LL7FF = range(8)
def lmap(iova, np, src, prot):
    return [L_MAP, iova, np, src, prot]
def lunmap(iova, np, allow_empty=0):
    return [L_UNMAP, iova, np, allow_empty, 0]
def lpin(iova, np, prot):
    return [L_PIN, iova, np, prot, 0]
def lunpin(index=0):
    return [L_UNPIN, index, 0, 0, 0]
def lrw(write, iova, length):
    return [L_RW, write, iova, length, 0]
def ldma(write, iova, length):
    return [L_DMA, write, iova, length, 0]
def ldirty(peek, iova, np):
    return [L_DIRTY, peek, iova, np, 0]
def round_(flags, slots, lanes, conflict=K_NONE, conflict_slot=0, args=(0, 0, 0)):
    """lanes: per lane, a list of per-slot ops (lanes 0 and 1 skip the conflict slot)."""
    out = [ROUND, flags, slots - 1, conflict | (conflict_slot << 3)]
    if conflict != K_NONE:
        out += list(args)
    for ops in lanes:
        for o in ops:
            out += o
    return out

SEEDS = {
    # map a memfd range, attach a domain, DMA both ways, translate, detach, unmap.
    "seed-map-attach-dma": hdr() +
        op(MAP, 0, file_rw(LEN0, LEN_64K), RW_ | FIXED, IOVA_1M) +
        op(DOMAIN, 0, 0, 0) + op(ATTACH, 0, 0) +
        op(DMA, 0, 1, area(0, 1), LEN_8K) + op(DMA, 0, 0, area(0, 1), LEN_8K) +
        op(DMA, 0, 1, area(0, 3), LEN_8K) +
        op(TRANSLATE, 0, 1, area(0, 7)) + op(TRANSLATE, 0, 2, area(0, 4)) +
        op(FAULTS, 0) + op(DETACH, 0, 0) + op(UNMAP, 0, 2, IOVA_0, LEN0),
    # an access pins, the mapping is unmapped: callback unpins (and probes).
    "seed-access-pin-unmap": hdr() +
        op(MAP, 0, file_rw(LEN_4K, LEN_32K), RW_) +
        op(ACCESS, 0, 0, 2) + op(PIN, 0, area(0, 0), LEN_12K, RW_) +
        op(RW, 0, 1, area(0, 1), LEN_4K1) + op(RW, 0, 0, area(0, 0), to_end()) +
        op(UNMAP, 0, 0, area(0, 0), to_end()) + op(ACCESS_DESTROY, 0),
    # a domain and two accesses, one refusing every other notification.
    "seed-access-retry": hdr() +
        op(DOMAIN, 1, 0, 0) + op(ATTACH, 0, 1) +
        op(MAP, 0, file_rw(pages(16), LEN_64K), RW_ | FIXED, IOVA_2M) +
        op(ACCESS, 0, 0, 1) + op(ACCESS, 1, 0, 3) +
        op(PIN, 0, area(0, 0), LEN_8K, R) + op(PIN, 1, area(0, 1), LEN_8K, W) +
        op(UNPIN, 1, 0) + op(PIN, 1, area(0, 2), LEN_4K, RW_) +
        op(UNMAP, 0, 1, IOVA_0, LEN_2M + 0) + op(UNMAP, 0, 0, area(0, 0), to_end()),
    # copy between address spaces shares pins; unmap the original.
    "seed-copy": hdr() +
        op(MAP, 0, file_rw(LEN0, LEN_64K), RW_) + op(MAP, 0, file_rw(LEN_64K, LEN_32K), R) +
        op(DOMAIN, 0, 0, 0) + op(ATTACH, 1, 0) +
        op(COPY, 1, 0, area(0, 0), to_end(1), R) +
        op(COPY, 1, 0, area(0, 1), LEN_8K, RW_ | FIXED, IOVA_16M) +
        op(ACCESS, 0, 1, 0) + op(PIN, 0, area(0, 0), LEN_4K, R) +
        op(UNMAP, 0, 2, IOVA_0, LEN0) + op(DMA, 0, 0, area(1, 0), LEN_4K) +
        op(UNMAP, 1, 2, IOVA_0, LEN0),
    # simulated, user and read-only memory; a small memlock limit.
    "seed-sources-limits": hdr(0, 1, 4, 3) +
        op(MAP, 0, simulated(0, LEN0, LEN_256K), RW_) +
        op(MAP, 0, user_rw(LEN0, LEN_64K), RW_) +
        op(MAP, 0, user_ro_flag(LEN_64K, LEN_8K), R) +
        op(MAP, 1, file_ro(LEN0, LEN_32K), R) + op(MAP, 1, file_ro(LEN0, LEN_32K), W) +
        op(DOMAIN, 0, 0, 0) + op(ATTACH, 0, 0) + op(DOMAIN, 1, 0, 1) + op(ATTACH, 1, 1) +
        op(DMA, 0, 0, area(0, 0), LEN_4K) + op(DMA, 0, 1, area(1, 0), LEN_4K) +
        op(MAP, 0, user_unmapped(False, LEN_4K), R) + op(DETACH, 0, 0) +
        op(MAP, 0, user_unmapped(True, LEN_8K), R) + op(ATTACH, 0, 0) +
        op(LIMIT, 0, 2) + op(MAP, 0, simulated(1, LEN0, LEN_2M), R) + op(LIMIT, 0, 0),
    # reserved and allowed ranges steer allocation; domain aperture conflicts.
    "seed-ranges": hdr() +
        op(ALLOWED, 0, 2, IOVA_1M, LEN_1M, IOVA_16M, LEN_2M) +
        op(RESERVED, 0, 0, IOVA_4M, LEN_64K) +
        op(MAP, 0, file_rw(LEN0, LEN_32K), RW_) + op(MAP, 0, file_rw(LEN0, LEN_1M), RW_) +
        op(RESERVED, 0, 1, IOVA_4M, LEN_64K) + op(RESERVED, 0, 0, IOVA_4M, LEN_64K) +
        op(RESERVED, 0, 3, 0) +
        op(DOMAIN, 0, 2, 1) + op(ATTACH, 0, 0) + op(ALLOWED, 0, 0) + op(ATTACH, 0, 0) +
        op(DOMAIN, 1, 1, 2) + op(ATTACH, 1, 1) +
        op(MAP, 1, file_rw(LEN0, LEN_4K), R | FIXED, IOVA_0) +
        op(MAP, 1, file_rw(LEN0, LEN_4K), R | FIXED, IOVA_MAX_1000),
    # byte-granular mappings, then an access or a domain needs alignment.
    "seed-alignment": hdr() +
        op(MAP, 0, user_rw(LEN1, LEN_FFF), R) +
        op(ACCESS, 0, 0, 0) + op(DOMAIN, 0, 5, 0) + op(ATTACH, 0, 0) +
        op(UNMAP, 0, 2, IOVA_0, LEN0) + op(ACCESS, 0, 0, 0) +
        op(MAP, 0, file_rw(LEN0, LEN_64K), RW_ | FIXED, IOVA_64K) +
        op(DOMAIN, 1, 10, 0) + op(ATTACH, 0, 1),
    # an access keeps its IOAS alive after the slot is replaced.
    "seed-recreate": hdr(1, 2) +
        op(MAP, 0, file_rw(LEN0, LEN_8K), RW_) + op(ACCESS, 1, 0, 0) +
        op(PIN, 1, area(0, 0), LEN_8K, R) + op(RECREATE, 0, 5) +
        op(MAP, 0, file_rw(LEN0, LEN_8K), RW_) + op(MAP, 0, file_rw(LEN0, LEN_8K), RW_) +
        op(ACCESS_DESTROY, 1) + op(LIMIT, 6, 2) + op(LIMIT, 3, 0) + op(LIMIT, 1, 0),
    # the dirty log: access and DMA writes, a pin, reads that clear or peek,
    # an unmap that clears, a bitmap one word short, tracking off.
    "seed-dirty": hdr() +
        op(MAP, 0, file_rw(LEN0, LEN_64K), RW_ | FIXED, IOVA_1M) +
        op(DOMAIN, 0, 0, 0) + op(ATTACH, 0, 0) + op(ACCESS, 0, 0, 0) +
        op(DIRTY, 0, DIRTY_ON) +
        op(RW, 0, 1, area(0, 1), LEN_4K1) + op(DMA, 0, 1, area(0, 3), LEN_4K) +
        op(PIN, 0, area(0, 2), LEN_4K, R) +
        op(DIRTY, 0, DIRTY_PEEK, IOVA_1M, LEN_64K) +
        op(DIRTY, 0, DIRTY_READ, IOVA_1M, LEN_64K) +
        op(DIRTY, 0, DIRTY_READ, IOVA_1M, LEN_1M) +
        op(DIRTY, 0, DIRTY_READ | SHORT_BITMAP, IOVA_1M, LEN_64K) +
        op(DIRTY, 0, DIRTY_READ | ALIGN_IOVA | ROUND_LEN, area(0, 6), LEN_4K1) +
        op(RW, 0, 1, area(0, 0), LEN_4K) + op(UNMAP, 0, 0, area(0, 0), to_end()) +
        op(DIRTY, 0, DIRTY_READ, IOVA_1M, LEN_64K) +
        op(DIRTY, 0, DIRTY_OFF) + op(DIRTY, 0, DIRTY_READ, IOVA_1M, LEN_64K),
    # per-page pins: counts, host addresses, unpin of unpinned pages, a
    # dirty read that reports them, an unmap whose callback unpins them.
    "seed-page-pins": hdr() +
        op(MAP, 0, file_rw(LEN0, LEN_32K), RW_ | FIXED, IOVA_1M) +
        op(MAP, 0, simulated(0, LEN0, LEN_8K), RW_ | FIXED, IOVA_2M) +
        op(ACCESS, 0, 0, 0) + op(ACCESS, 1, 0, 1) +
        op(PIN_PAGES, 0, 0, area(0, 1), 3, RW_) + op(PIN_PAGES, 0, 0, area(0, 2), 2, R) +
        op(PIN_PAGES, 1, 0, area(0, 0), 8, W) + op(PIN_PAGES, 1, 0, area(0, 0), 9, R) +
        op(PIN_PAGES, 0, PAGES_NULL_HOST, area(0, 0), 1, R) +
        op(PIN_PAGES, 0, 0, area(1, 0), 1, R) +
        op(PIN_PAGES, 0, PAGES_ALIGN, IOVA_MAX, 2, R) +
        op(PIN_PAGES, 0, 0, IOVA_1M, TOO_MANY_PAGES, R) +
        op(UNPIN_PAGES, 0, 0, 1) + op(UNPIN_PAGES, 0, 1, 3) + op(UNPIN_PAGES, 0, 0x80, area(0, 6), 1) +
        op(DIRTY, 0, DIRTY_ON) + op(DIRTY, 0, DIRTY_READ, IOVA_1M, LEN_32K) +
        op(UNMAP, 0, 0, area(0, 0), to_end()) + op(UNPIN_PAGES, 1, 0x80, IOVA_1M, 1) +
        op(ACCESS_DESTROY, 0),
    # live update: invalidate, pins and rw fail with EBUSY while DMA goes on,
    # replace with other pages, EINVAL/ENOENT/EBUSY/EPERM of replace_host.
    "seed-live-update": hdr() +
        op(MAP, 0, file_rw(LEN0, LEN_32K), RW_ | FIXED, IOVA_1M) +
        op(DOMAIN, 0, 0, 0) + op(ATTACH, 0, 0) + op(ACCESS, 0, 0, 0) +
        op(LIVE, 0, INVALIDATE, area(0, 0), to_end()) +
        op(LIVE, 0, INVALIDATE, area(0, 0), to_end()) +
        op(LIVE, 0, INVALIDATE, area(0, 1), LEN_4K) +
        op(RW, 0, 1, area(0, 0), LEN_4K) + op(PIN, 0, area(0, 0), LEN_4K, R) +
        op(PIN_PAGES, 0, 0, area(0, 0), 1, R) + op(DMA, 0, 1, area(0, 0), LEN_4K) +
        op(LIVE, 0, REPLACE_FILE_SLICE, area(0, 0), LEN_64K) +
        op(DMA, 0, 0, area(0, 0), LEN_4K) + op(TRANSLATE, 0, 1, area(0, 0)) +
        op(LIVE, 0, REPLACE_SAME, area(0, 0)) +
        op(PIN, 0, area(0, 0), LEN_4K, R) + op(LIVE, 0, INVALIDATE, area(0, 0), to_end()) +
        op(LIVE, 0, REPLACE_SAME, area(0, 0)) + op(UNPIN, 0, 0) +
        op(LIVE, 0, REPLACE_SOURCE, area(0, 0), file_ro(LEN0, LEN_32K)) +
        op(LIVE, 0, REPLACE_SOURCE, area(0, 0), user_rw(LEN0, LEN_32K)) +
        op(RW, 0, 0, area(0, 1), LEN_4K) + op(LIVE, 0, REPLACE_SAME, IOVA_4K),
    # wrap-around and UINT64_MAX arguments.
    "seed-edges": hdr() +
        op(MAP, 0, file_rw(LEN0, LEN_4K), R | FIXED, IOVA_MAX) +
        op(MAP, 0, file_rw(LEN0, LEN_8K), R | FIXED, IOVA_MAX_FFF) +
        op(MAP, 0, file_rw(LEN0, LEN_4K), R | FIXED, IOVA_MAX_1FFF) +
        op(UNMAP, 0, 0, IOVA_MAX_1FFF, LEN_MAX) + op(UNMAP, 0, 0, IOVA_MAX_1FFF, LEN_8K) +
        op(UNMAP, 0, 1, IOVA_MAX_1FFF, LEN_4K) + op(UNMAP, 0, 0, IOVA_MAX_1FFF, LEN_4K) +
        op(ACCESS, 0, 0, 0) + op(PIN, 0, IOVA_MAX_1FFF, LEN_8K, R) +
        op(RW, 0, 0, IOVA_MAX_1, LEN_4K) + op(DOMAIN, 0, 1, 0) + op(ATTACH, 0, 0) +
        op(TRANSLATE, 0, 1, IOVA_MAX) + op(DMA, 0, 0, IOVA_MAX_1FFF, LEN_8K),
    # three lanes map, pin, DMA, read/write, read the dirty log and unmap,
    # each in its own window, at once, with a domain attached.
    "seed-round-lanes": hdr() +
        op(DOMAIN, 0, 0, 0) + op(ATTACH, 0, 0) + op(DIRTY, 0, DIRTY_ON) +
        round_(R_THREE | R_ACCESS, 4, [
            [lmap(0, NP16, lsrc(LS_FILE), RW_), lpin(AREA, NP2, R), ldma(1, AREA, LL64K),
             lunmap(AREA, TO_END)],
            [lmap(4, NP8, lsrc(LS_USER), RW_), lrw(1, AREA, LL4K1), ldirty(0, AREA, NP8),
             lunmap(AREA, TO_END)],
            [lmap(0, NP32, lsrc(LS_SIM), RW_), lmap(40, NP1, lsrc(LS_USER_NONE), R),
             ldma(0, AREA, LL4K), lpin(AREA, NP4, W)]]) +
        round_(R_THREE | R_ACCESS | R_REFUSE, 3, [
            [lmap(8, NP4, lsrc(LS_FILE, 3), RW_), lrw(1, AREA, LL12K), lunmap(AREA, TO_END)],
            [lmap(8, NP3, lsrc(LS_USER_RO), RW_), lmap(8, NP3, lsrc(LS_USER_RO), R),
             ldirty(1, 8, NP4)],
            [lunmap(AREA, TO_END), lmap(0, NP2, lsrc(LS_FILE), W), ldma(1, AREA, LL8K)]]) +
        op(UNMAP, 0, 2, IOVA_0, LEN0),
    # an unmap races with a pin of the same area (and a read of it), while a
    # third lane works on its own; callbacks refuse every other round.
    "seed-round-unmap-pin": hdr() +
        op(DOMAIN, 0, 0, 0) + op(ATTACH, 0, 0) +
        op(MAP, 0, file_rw(pages(224), LEN_32K), RW_ | FIXED, raw(SHARED)) +
        round_(R_THREE | R_ACCESS | R_REFUSE, 2, [
            [lmap(0, NP4, lsrc(LS_FILE), RW_)], [lpin(0, NP1, R)],
            [lmap(0, NP4, lsrc(LS_FILE), RW_), lunmap(AREA, TO_END)]],
            K_UNMAP_PIN, 0, (1, R, 0)) +
        op(MAP, 0, file_rw(pages(224), LEN_32K), RW_ | FIXED, raw(SHARED)) +
        round_(R_ACCESS | R_PROBE, 2, [[lunmap(AREA, TO_END)], [lrw(0, 0, LL4K)]],
               K_UNMAP_RW, 0, (3, 0, 0)) +
        op(MAP, 0, file_rw(pages(224), LEN_64K), RW_ | FIXED, raw(SHARED)) +
        round_(R_THREE, 1, [[], [], [lmap(0, NP8, lsrc(LS_FILE), RW_)]], K_UNMAP_UNMAP, 0) +
        op(MAP, 0, file_rw(pages(224), LEN_64K), RW_ | FIXED, raw(SHARED)) +
        round_(0, 1, [[], []], K_UNMAP_UNMAP, 0, (1, 0, 0)),
    # a fixed map races with an unmap of the same range (EBUSY while it fills),
    # then two maps race for one range.
    "seed-round-map-unmap": hdr() +
        op(DOMAIN, 0, 0, 0) + op(ATTACH, 0, 0) +
        round_(R_THREE, 1, [[], [], [lmap(0, NP16, lsrc(LS_FILE), RW_)]],
               K_MAP_UNMAP, 0, (0, NP16, 2)) +
        round_(R_THREE, 1, [[], [], [lunmap(AREA, TO_END)]], K_MAP_UNMAP, 0, (1, NP4, 2 | 8)) +
        op(MAP, 0, file_rw(pages(224), LEN_64K), RW_ | FIXED, raw(SHARED)) +
        round_(0, 1, [[], []], K_MAP_UNMAP, 0, (0, NP16, 2)) +
        round_(R_THREE, 1, [[], [], [lmap(0, NP1, lsrc(LS_SIM), R)]], K_MAP_MAP, 0,
               (2, NP8, 2 | (1 << 4))) +
        round_(0, 1, [[], []], K_MAP_MAP, 0, (3, NP2, 2 | 8)),
    # a DMA (then an access) write races with reads of the dirty log.
    "seed-round-write-dirty": hdr() +
        op(DOMAIN, 0, 0, 0) + op(ATTACH, 0, 0) + op(DIRTY, 0, DIRTY_ON) +
        op(MAP, 0, file_rw(pages(224), LEN_64K), RW_ | FIXED, raw(SHARED)) +
        op(DMA, 0, 1, raw(SHARED + 0x3000), LEN_4K) +
        round_(0, 1, [[], []], K_WRITE_DIRTY, 0, (1, NP16, 0)) +
        round_(0, 1, [[], []], K_WRITE_DIRTY, 0, (1, NP8, 1)) +
        round_(R_ACCESS, 2, [[ldma(1, 0, LL4K)], [ldirty(0, 0, NP1)]],
               K_WRITE_DIRTY, 1, (0, NP4, 0)),
    # a small memlock limit: the lanes' pinning maps compete for it.
    "seed-round-tight": hdr(0, 0, 3) +
        op(DOMAIN, 0, 0, 0) + op(ATTACH, 0, 0) +
        round_(R_THREE, 2, [
            [lmap(0, NP32, lsrc(LS_FILE), RW_), lmap(40, NP32, lsrc(LS_SIM), RW_)],
            [lmap(0, NP32, lsrc(LS_USER), RW_), lmap(40, NP64, lsrc(LS_SIM), RW_)],
            [lmap(0, NP32, lsrc(LS_FILE), R), lmap(40, NP32, lsrc(LS_SIM), R)]]) +
        op(UNMAP, 0, 2, IOVA_0, LEN0),
}


# ---------------------------------------------------------------------------
# vfio_type1_fuzzer seeds (see the comment at the top of vfio_type1_fuzzer.cpp).
# Header: dma entry limit (& 3: keep, 1, 2, 4), software group config,
# mediated group (bit 0 set: none), SET_IOMMU (bit 0; bit 1: TYPE1 v1).
IOCTL, GROUP, SW_GROUP, MED_GROUP = 0, 4, 6, 7
# ioctl selectors (index into kRequests).
Q_API, Q_CHECK, Q_SET, Q_INFO, Q_MAP, Q_UNMAP, Q_DIRTY, Q_GROUP_STATUS = range(8)
ARGSZ = 5  # the struct's natural argsz
ARGSZ_SHORT = 1
# iova and size picks (kIovaTable / kSizeTable indexes).
V_0, V_4K, V_8K, V_64K, V_1M, V_2M, V_16M, V_FEE, V_2_39, V_2_48, V_MAX_FFF, V_MAX = range(12)
S_0, S_1, S_4K, S_8K, S_12K, S_64K, S_256K, S_1M, S_2M, S_4G, S_MAX = range(11)
SHARED, ANON, NONE_ = 0, 2, 3
MAP_R, MAP_W, MAP_VADDR = 1, 2, 4
UNMAP_DIRTY, UNMAP_ALL, UNMAP_VADDR = 1, 2, 4
D_START, D_STOP, D_GET = 1, 2, 4
BITMAP_OK = 1  # 4 KiB pages, natural size, our buffer

def vmap(flags, iova, size, where=SHARED, page=0):
    return [IOCTL, Q_MAP, ARGSZ, flags, iova, size, where, page, 0]
def vunmap(flags, iova, size, bitmap=None):
    return [IOCTL, Q_UNMAP, flags, iova, size, ARGSZ] + (bitmap or []) + [0]
def vdirty(flags, iova=V_1M, size=S_64K):
    return [IOCTL, Q_DIRTY, flags, iova, size, BITMAP_OK, ARGSZ, 0]
def vinfo(argsz=ARGSZ):
    return [IOCTL, Q_INFO, argsz, 0, 0]
def vpin(iova, npage, prot=3):
    return [GROUP, 0, iova, npage - 1, prot]
def vunpin(index=0):
    return [GROUP, 1, index]
def vrw(iova, size, write, device=False):
    return [GROUP, 3 if device else 2, iova, size, write]

VFIO_SEEDS = {
    "seed-map-dma-pin-unmap": [0, 0, 0, 1] +
        vmap(MAP_R | MAP_W, V_1M, S_64K) + vinfo() + vinfo(ARGSZ_SHORT) +
        vrw(V_1M, S_8K, 1, device=True) + vrw(V_1M, S_8K, 0, device=True) +
        vpin(V_1M, 2) + vrw(V_1M, S_4K, 1) + vunpin() + vpin(V_1M, 1, 1) +
        vunmap(0, V_1M, S_64K),
    "seed-dirty-tracking": [0, 0, 0, 1] +
        vmap(MAP_R | MAP_W, V_1M, S_64K, ANON) + vdirty(D_START) +
        vrw(V_1M, S_8K, 1, device=True) + vdirty(D_GET) +
        vunmap(UNMAP_DIRTY, V_1M, S_64K, [BITMAP_OK]) + vdirty(D_STOP),
    # dirty bits: a device write, a mediated write of one byte, a pinned
    # page; the second GET_BITMAP reports only the pinned page.
    "seed-dirty-bits": [0, 0, 0, 1] +
        vmap(MAP_R | MAP_W, V_64K, S_64K, ANON) + vdirty(D_START) +
        vrw(V_64K, S_8K, 1, device=True) + vrw(14 + 0x14, S_1, 1) + vpin(14 + 0x18, 1) +
        vdirty(D_GET, V_64K, S_64K) + vdirty(D_GET, V_64K, S_64K) +
        vrw(14 + 0x1f, S_4K, 1) + vdirty(D_START) + vdirty(D_GET, V_64K, S_64K) +
        vunmap(UNMAP_ALL, V_0, S_0) + vdirty(D_STOP),
    "seed-vaddr-update": [0, 0, 0, 1] +
        vmap(MAP_R | MAP_W, V_1M, S_64K, SHARED, 4) + vpin(V_1M, 1) +
        vunmap(UNMAP_VADDR, V_1M, S_64K) + vpin(V_1M, 1) + vrw(V_1M, S_4K, 0) +
        vmap(MAP_VADDR, V_1M, S_64K, SHARED, 4) + vrw(V_1M, S_4K, 0) +
        vunmap(UNMAP_ALL, V_0, S_0),
    "seed-type1v1-limits": [1, 0, 0, 3] +
        vmap(MAP_R, V_1M, S_4K) + vmap(MAP_R, V_2M, S_4K) + vpin(V_1M, 1) +
        [IOCTL, Q_CHECK, 3, 0, IOCTL, Q_CHECK, 8, 0, IOCTL, Q_API, 0] +
        [IOCTL, 0xf0, 0x3b, 0x6b, 0, 0, 0] + [IOCTL, Q_GROUP_STATUS, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0] +
        vunmap(0, V_1M, S_8K),
    # type1 (v1) unmap rules: a request starting inside a mapping unmaps
    # nothing (not even a later mapping it covers); one covering a mapping's
    # start removes it whole.
    "seed-type1v1-unmap": [0, 0, 0, 3] +
        vmap(MAP_R | MAP_W, V_64K, S_64K) + vmap(MAP_R, V_1M, S_4K) +
        vunmap(0, 14 + 17, S_1M) + vunmap(0, V_8K, S_64K) + vunmap(0, V_8K, S_64K) +
        vmap(MAP_R, V_64K, S_8K) + vunmap(UNMAP_ALL, V_0, S_0),
    "seed-groups": [0, 26, 1, 0] +
        [IOCTL, Q_INFO, ARGSZ, 0, 0] + [IOCTL, Q_SET, 3, 0] +
        vmap(MAP_R | MAP_W, V_16M, S_2M, SHARED, 0) +
        [SW_GROUP, 4] + [MED_GROUP, 0] + vpin(V_16M, 4) +
        vmap(MAP_R, V_FEE, S_4K, ANON) + [SW_GROUP, 1] + [MED_GROUP, 1] +
        vmap(MAP_R, V_8K, S_4K, NONE_),
}


def main():
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "ioas_sequence")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        assert len(data) <= 1024, name
        with open(os.path.join(out, name), "wb") as f:
            f.write(bytes(b & 0xFF for b in data))
        print(f"{name}: {len(data)} bytes")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "vfio_type1")
    os.makedirs(out, exist_ok=True)
    for name, data in VFIO_SEEDS.items():
        assert len(data) <= 1024, name
        with open(os.path.join(out, name), "wb") as f:
            f.write(bytes(b & 0xFF for b in data))
        print(f"vfio_type1/{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
