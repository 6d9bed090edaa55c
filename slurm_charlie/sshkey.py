"""Per-job ssh key for the guests of a VM job.

Every node renders meta/ by itself, so every node must come to the same key
without talking to the others.  The key's seed is an HMAC of the job id and
user under a secret all nodes of the cluster share and users cannot read
(vm.ssh_secret, by default the munge key): same job, same key on every node;
another job or user cannot derive it.  The public key comes from the
`cryptography` package; the files are written here in OpenSSH's formats
because every node must write the same bytes (cryptography's own OpenSSH
serialiser puts random check numbers in the private key file).
`ssh-keygen -y` agreeing is checked by the tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

def public_key(seed: bytes) -> bytes:
    """The 32-byte Ed25519 public key of a 32-byte private seed, computed by
    the `cryptography` package (constant-time code, not hand-written curve
    arithmetic that would branch on the secret as root)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


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


def job_keys(secret_path: str, job_id: str, uid: int) -> dict[str, str] | None:
    """As root: the job's ssh key pair, the same on every node, from the
    site secret (``vm.ssh_secret``, root-only).  None without a secret."""
    from .log import log
    if not secret_path:
        return None
    try:
        with open(secret_path, "rb") as f:
            secret = f.read()
    except OSError as e:
        log.warning("vm.ssh_secret %s: %s; guests get no ssh keys", secret_path, e.strerror)
        return None
    private, public = openssh_keys(job_seed(secret, job_id, uid), f"slurm-charlie-job-{job_id}")
    return {"private": private.decode(), "public": public.decode()}
