#!/usr/bin/env python3
"""Write the hand-made seed inputs of fuzz/corpus/vhost_message/ and
fuzz/corpus/vhost_desc_chain/ (the encodings are described at the top of
vhost_message_fuzzer.cpp and vhost_desc_chain_fuzzer.cpp). Run it from
anywhere; it rewrites only the seeds it names."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
NEXT, WRITE, INDIRECT = 1, 2, 4


def desc(addr, length, flags, nxt=0):
    return struct.pack('<QIHH', addr, length, flags, nxt)


def write(name, target, data):
    d = os.path.join(HERE, 'corpus', target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), 'wb') as f:
        f.write(data)


# --- vhost_desc_chain: size exponent, flags, head, 16 descriptors, guest memory
G = 0x10000  # guest memory's GPA in the fuzzer
def chain_seed(descs, memory=b'', flags=1, head=0):
    table = b''.join(descs).ljust(16 * 16, b'\0')
    return bytes([4, flags]) + struct.pack('<H', head) + table + memory


hdr_in = struct.pack('<IIQ', 0, 0, 3)
hdr_out = struct.pack('<IIQ', 1, 0, 5)
write('seed-in', 'vhost_desc_chain',
      chain_seed([desc(G, 16, NEXT, 1), desc(G + 0x100, 512, NEXT | WRITE, 2),
                  desc(G + 0x400, 1, WRITE)], hdr_in))
write('seed-out', 'vhost_desc_chain',
      chain_seed([desc(G, 16, NEXT, 1), desc(G + 0x100, 512, NEXT, 2),
                  desc(G + 0x400, 1, WRITE)], hdr_out.ljust(0x100, b'\0') + b'\x5a' * 64))
write('seed-indirect', 'vhost_desc_chain',
      chain_seed([desc(G + 0x200, 48, INDIRECT)],
                 hdr_in.ljust(0x200, b'\0') + desc(G, 16, NEXT, 1) +
                 desc(G + 0x100, 512, NEXT | WRITE, 2) + desc(G + 0x400, 1, WRITE)))
write('seed-loop', 'vhost_desc_chain',
      chain_seed([desc(G, 16, NEXT, 1), desc(G, 16, NEXT, 0)], hdr_in))
write('seed-outside', 'vhost_desc_chain',
      chain_seed([desc(G, 16, NEXT, 1), desc(0x1000, 512, NEXT | WRITE, 2),
                  desc(G + 0x400, 1, WRITE)], hdr_in))

# --- vhost_message: steps (see vhost_message_fuzzer.cpp)
GPA = 0x100000
ALL_FEATURES = (1 << 64) - 1
ACCESS_PLATFORM = 1 << 33


def setup(features, size_exp=4):
    return bytes([0x80]) + struct.pack('<Q', features) + bytes([size_exp])


def memory(offset, data):
    assert offset % 16 == 0 and len(data) < 256
    return bytes([0xc0]) + struct.pack('<H', offset // 16) + bytes([len(data)]) + data


def request_steps(base):
    """A 512-byte read of sector 3 on queue 0, addresses in `base` space."""
    table = (desc(base + 0x3000, 16, NEXT, 1) + desc(base + 0x4000, 512, NEXT | WRITE, 2) +
             desc(base + 0x5000, 1, WRITE))
    return (memory(0, table) + memory(0x3000, hdr_in) +
            memory(0x1000, struct.pack('<HHH', 0, 1, 0)))


write('seed-gpa-read', 'vhost_message', setup(ALL_FEATURES & ~ACCESS_PLATFORM) + request_steps(GPA))
write('seed-iotlb-read', 'vhost_message', setup(ALL_FEATURES) + request_steps(GPA))
GET_FEATURES, GET_CONFIG = 0, 19
UNKNOWN = 21
write('seed-messages', 'vhost_message',
      bytes([GET_FEATURES, 0, 0]) +
      bytes([GET_CONFIG, 1, 20]) + struct.pack('<III', 0, 8, 0) + b'\0' * 8 +
      bytes([UNKNOWN]) + struct.pack('<I', 99) + bytes([0, 0]))
