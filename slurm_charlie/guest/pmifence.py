"""Release a rank from a PMI fence that does not end (docs/developer.rst,
"MPICH's finalize hang between guests").

Debian 12's MPICH (4.0.2, UCX) ends MPI_Finalize with a PMI barrier after
closing its UCX endpoints; a rank whose close still needs a peer's progress
then waits for peers that sit in the barrier and never progress: a deadlock
(fixed in MPICH 4.1.3/4.2 by removing that barrier).  The agent sits on each
task's PMI_FD stream, so it can break it without changing what a rank can
observe: when a fence (PMI2 kvs-fence, PMI1 barrier_in) has not been
answered after `release` seconds, the rank gets the answer early and goes on
(closing its sockets, which lets the waiting peer finish), but everything it
sends from then on is held back until the real answer has come from Slurm's
PMI server, which is then swallowed.  So no KVS read is answered before the
fence is complete everywhere; only a barrier used as a bare clock (nothing
read through PMI after it) could be left early, and only after `release`
seconds.  release = 0 turns this off.
"""

import threading


def split(buf):
    """(complete messages, rest) of a PMI byte stream: PMI1 lines (cmd=...
    up to a newline; mcmd=... up to endcmd) and PMI2 frames (a 6-character
    length, then that many bytes)."""
    out = []
    while buf:
        if buf.startswith(b"mcmd="):
            end = buf.find(b"endcmd\n")
            if end < 0:
                break
            end += len(b"endcmd\n")
        elif buf[:1].isalpha():
            end = buf.find(b"\n")
            if end < 0:
                break
            end += 1
        else:
            if len(buf) < 6:
                break
            try:
                end = 6 + int(buf[:6])
            except ValueError:  # not PMI: pass the rest through unchanged
                out.append(buf)
                return out, b""
            if len(buf) < end:
                break
        out.append(buf[:end])
        buf = buf[end:]
    return out, buf


def _body(msg):
    return msg if msg[:1].isalpha() else msg[6:]


def is_fence(msg):
    body = _body(msg)
    return body.startswith(b"cmd=kvs-fence;") or body.rstrip().startswith(b"cmd=barrier_in")


def is_fence_answer(msg):
    body = _body(msg)
    return body.startswith(b"cmd=kvs-fence-response;") or body.startswith(b"cmd=barrier_out")


def answer_for(fence):
    """The answer Slurm's PMI server gives on success, in the fence's framing."""
    if fence[:1].isalpha():
        return b"cmd=barrier_out rc=0\n"
    body = b"cmd=kvs-fence-response;rc=0;"
    return b"%6d" % len(body) + body


def failed(answer):
    """The answer carries rc=N with N other than 0."""
    body = _body(answer)
    at = body.find(b"rc=")
    if at < 0:
        return False
    digits = body[at + 3:].split(b";")[0].split()[0] if body[at + 3:].strip() else b"0"
    return digits not in (b"0",)


class FenceRelease:
    """Between a task (to_task) and Slurm's PMI server (to_server)."""

    def __init__(self, to_task, to_server, release, on_failure, on_release=None):
        self.to_task, self.to_server = to_task, to_server
        self.release, self.on_failure, self.on_release = release, on_failure, on_release
        self.lock = threading.Lock()
        self.up, self.down = b"", b""
        self.waiting = False      # a fence sent, its answer not yet here
        self.released = False     # ... and the task already has our answer
        self.held = []            # what the task sent since: after the answer
        self.timer = None

    def from_task(self, data):
        with self.lock:
            msgs, self.up = split(self.up + data)
            for msg in msgs:
                self._up(msg)

    def _up(self, msg):
        if self.released:
            self.held.append(msg)
            return
        self.to_server(msg)
        if is_fence(msg) and self.release > 0:
            self.waiting = True
            self.timer = threading.Timer(self.release, self._expire, (msg,))
            self.timer.daemon = True
            self.timer.start()

    def _expire(self, fence):
        with self.lock:
            if self.waiting and not self.released:
                self.released = True
                self.to_task(answer_for(fence))
                if self.on_release is not None:
                    self.on_release(self.release)

    def from_server(self, data):
        with self.lock:
            msgs, self.down = split(self.down + data)
            for msg in msgs:
                if self.waiting and is_fence_answer(msg):
                    self.waiting = False
                    if self.timer is not None:
                        self.timer.cancel()
                    if self.released:
                        self.released = False
                        if failed(msg):
                            self.on_failure(msg)
                        held, self.held = self.held, []
                        for h in held:  # in order; a fence among them waits anew
                            self._up(h)
                        continue
                self.to_task(msg)
