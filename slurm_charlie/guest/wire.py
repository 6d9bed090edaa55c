"""The frames that carry srun tasks between a node and its guest.

One virtio-serial port per guest carries every task of every step: the
host's task relay (one per Slurm task, as the user) talks to the node's
multiplexer over a unix socket in the job directory, the multiplexer puts
each relay's frames on the port under a channel number, and the guest's
agent (/ch/opt/agent.py) runs the task.  A frame is a 9-byte header
(channel, kind, length; big-endian) and its payload.  This file is shared
with the guest (/ch/opt) and needs nothing but the standard library.
"""

import struct

HEADER = struct.Struct(">IBI")
MAX_PAYLOAD = 1 << 20

# host -> guest
OPEN = 1       # JSON: {"argv": [...], "env": {...}, "cwd": str, "pmi": bool}
STDIN = 2
STDIN_EOF = 3
SIGNAL = 4     # one byte: the signal number
CLOSE = 5      # the relay is gone (killed): kill the task
# guest -> host
STDOUT = 6
STDERR = 7
EXIT = 8       # JSON: {"status": N} (negative: killed by signal -N)
HELLO = 9      # channel 0: the agent is up (payload: guest number)
# both ways
PMI = 10       # the task's PMI_FD stream, unchanged


def pack(channel, kind, payload=b""):
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("frame too large")
    return HEADER.pack(channel, kind, len(payload)) + payload


def read_exact(read, n):
    """n bytes from read(size) (a socket's recv or a file's read), fewer
    only at end of stream."""
    chunks, got = [], 0
    while got < n:
        b = read(n - got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def read_frame(read):
    """(channel, kind, payload), or None at end of stream (or a torn frame)."""
    head = read_exact(read, HEADER.size)
    if len(head) < HEADER.size:
        return None
    channel, kind, length = HEADER.unpack(head)
    if length > MAX_PAYLOAD:
        return None
    payload = read_exact(read, length)
    if len(payload) < length:
        return None
    return channel, kind, payload


def chunks(data, size=65536):
    """data cut into payload-sized pieces (at least one, maybe empty)."""
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]
