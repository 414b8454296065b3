"""MPEG-4 Part 2 (Xvid / DivX) frame counting from the bitstream, without decoding.

FFmpeg's decoder outputs one frame per *coded* VOP: a packed packet (a P-VOP followed by a B-VOP)
gives two, the N-VOP placeholder that follows it (``vop_coded`` = 0) gives none of its own, and a
lone N-VOP (Xvid writes one at the end of some clips: the header then promises one frame more
than decodes, as in HMDB51) gives none. So the frames that decode are the coded VOPs, which the
VOP headers tell: start code, ``vop_coding_type``, ``modulo_time_base``, ``vop_time_increment``
(as many bits as the VOL's ``vop_time_increment_resolution`` needs) and ``vop_coded``.
``count_coded_vops`` returns None when a header cannot be read (no VOL, short-header H.263 mode):
the caller then counts by decoding. The corpus test checks the count against the decoder.
"""
from __future__ import annotations

VOP_START = b"\x00\x00\x01\xb6"


class _Bits:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.bit = data, pos * 8

    def read(self, n: int) -> int:
        value = 0
        for _ in range(n):
            byte = self.bit >> 3
            if byte >= len(self.data):
                raise EOFError
            value = (value << 1) | ((self.data[byte] >> (7 - (self.bit & 7))) & 1)
            self.bit += 1
        return value


def time_increment_bits(data: bytes) -> int | None:
    """Bits of ``vop_time_increment`` from the first video object layer header in ``data``; None if absent."""
    pos = 0
    while True:
        pos = data.find(b"\x00\x00\x01", pos)
        if pos < 0 or pos + 4 > len(data):
            return None
        if 0x20 <= data[pos + 3] <= 0x2F:
            break
        pos += 3
    try:
        b = _Bits(data, pos + 4)
        b.read(1)  # random_accessible_vol
        b.read(8)  # video_object_type_indication
        verid = 1
        if b.read(1):  # is_object_layer_identifier
            verid = b.read(4)
            b.read(3)
        if b.read(4) == 15:  # extended PAR
            b.read(16)
        if b.read(1):  # vol_control_parameters
            b.read(3)  # chroma_format, low_delay
            if b.read(1):  # vbv_parameters
                b.read(15 + 1 + 15 + 1 + 15 + 1 + 3 + 11 + 1 + 15 + 1)
        shape = b.read(2)
        if shape == 3 and verid != 1:
            b.read(4)
        b.read(1)  # marker
        resolution = b.read(16)
    except EOFError:
        return None
    if resolution < 1:
        return None
    return max((resolution - 1).bit_length(), 1)


def coded_vops(packet: bytes, bits: int) -> int | None:
    """Coded VOPs in one packet (0 for an N-VOP); None when a VOP header is cut short."""
    count, pos = 0, packet.find(VOP_START)
    while pos >= 0:
        # the header fields up to vop_coded fit in 64 bits (2 + modulo ones + 1 + 1 + <= 16 + 1 + 1)
        chunk = packet[pos + 4:pos + 12]
        head, have = int.from_bytes(chunk, "big") << (64 - 8 * len(chunk)), 8 * len(chunk)
        bit = 2  # vop_coding_type
        while bit < have and (head >> (63 - bit)) & 1:  # modulo_time_base: ones, then a zero
            bit += 1
        bit += 1 + 1 + bits + 1  # the zero, marker, vop_time_increment, marker
        if bit >= have:
            return None
        count += (head >> (63 - bit)) & 1  # vop_coded
        pos = packet.find(VOP_START, pos + 4)
    return count


def count_coded_vops(extradata: bytes | None, packets) -> int | None:
    """Frames an MPEG-4 Part 2 stream decodes to: its coded VOPs (``packets``: bytes-like, decode order)."""
    bits = time_increment_bits(bytes(extradata or b""))
    total = 0
    for packet in packets:
        data = bytes(packet)
        if bits is None:
            bits = time_increment_bits(data)
            if bits is None:
                return None
        found = coded_vops(data, bits)
        if found is None:
            return None
        total += found
    return total
