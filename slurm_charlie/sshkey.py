"""Per-job ssh key for the guests of a VM job.

Every node renders meta/ by itself, so every node must come to the same key
without talking to the others.  The key's seed is an HMAC of the job id and
user under a secret all nodes of the cluster share and users cannot read
(vm.ssh_secret, by default the munge key): same job, same key on every node;
another job or user cannot derive it.  Ed25519 public keys are computed here
(RFC 8032 arithmetic, standard library only) and written in OpenSSH's own
formats; `ssh-keygen -y` agreeing is checked by the tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

_P = 2 ** 255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P


def _inv(x: int) -> int:
    return pow(x, _P - 2, _P)


def _add(a: tuple, b: tuple) -> tuple:
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa = (y1 - x1) * (y2 - x2) % _P
    bb = (y1 + x1) * (y2 + x2) % _P
    cc = t1 * 2 * _D * t2 % _P
    dd = z1 * 2 * z2 % _P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(s: int, pt: tuple) -> tuple:
    q = (0, 1, 1, 0)
    while s:
        if s & 1:
            q = _add(q, pt)
        pt = _add(pt, pt)
        s >>= 1
    return q


def _base() -> tuple:
    y = 4 * _inv(5) % _P
    x2 = (y * y - 1) * _inv(_D * y * y + 1) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    if x & 1:
        x = _P - x
    return (x, y, 1, x * y % _P)


def public_key(seed: bytes) -> bytes:
    """The 32-byte Ed25519 public key of a 32-byte private seed."""
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    x, y, z, _ = _mul(a, _base())
    zi = _inv(z)
    x, y = x * zi % _P, y * zi % _P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def job_seed(secret: bytes, job_id: str, uid: int) -> bytes:
    return hmac.new(secret, f"slurm-charlie ssh {job_id} {uid}".encode(),
                    hashlib.sha256).digest()


def openssh_keys(seed: bytes, comment: str) -> tuple[bytes, bytes]:
    """(private key file, public key line) in OpenSSH formats, no passphrase."""
    pub = public_key(seed)
    blob = _string(b"ssh-ed25519") + _string(pub)
    check = struct.pack(">I", int.from_bytes(hashlib.sha256(seed).digest()[:4], "big"))
    priv = (check + check + blob + _string(seed + pub) + _string(comment.encode()))
    pad = 1
    while len(priv) % 8:
        priv += bytes([pad])
        pad += 1
    body = (b"openssh-key-v1\0" + _string(b"none") + _string(b"none") + _string(b"")
            + struct.pack(">I", 1) + _string(blob) + _string(priv))
    b64 = base64.b64encode(body).decode()
    lines = [b64[i:i + 70] for i in range(0, len(b64), 70)]
    private = ("-----BEGIN OPENSSH PRIVATE KEY-----\n" + "\n".join(lines)
               + "\n-----END OPENSSH PRIVATE KEY-----\n").encode()
    public = b"ssh-ed25519 " + base64.b64encode(blob) + b" " + comment.encode() + b"\n"
    return private, public
