"""Read an offline W&B run back in tests: W&B 0.31 writes no summary/config files offline."""
import struct
from pathlib import Path


def wandb_records(path: Path):
    """Raw records of a .wandb transaction log (LevelDB log format: 7-byte header, 32 KiB blocks).
    A log still being written yields its complete records only (none before its header)."""
    data = path.read_bytes()
    if len(data) < 7:
        return
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if n == 0 and kind == 0:  # zero padding up to the end of a block
            pos += left - 7
            continue
        if pos + n > len(data):  # the last record is not fully written yet
            return
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):  # FULL or LAST fragment
            yield buf
            buf = b""
