"""`sandbox up` refuses a machine whose own name does not resolve: srun runs
on it, slurmctld looks srun's host up at every job's end and waits 10 s
when that fails, and nodes then drain with "Kill task failed" (the Debian
13 lane's node had no /etc/hosts line for its name)."""

import socket

import pytest

from slurm_charlie.errors import NodeFault
from slurm_charlie.sandbox import Sandbox


def test_an_unresolvable_own_name_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "charlie-no-such-host.invalid")
    with pytest.raises(NodeFault) as e:
        Sandbox.check_own_name()
    text = str(e.value)
    assert "charlie-no-such-host.invalid" in text and "does not resolve" in text, text
    assert "127.0.1.1 charlie-no-such-host.invalid" in e.value.hint


def test_this_machines_own_name_passes():
    Sandbox.check_own_name()  # the sandbox runs here: its name resolves
