"""One line per event (trust round 2, class 4): what a user, an image's
author or a tool wrote reaches root's node log and the job's messages
escaped and bounded (errors.printable); the log file itself is checked by
tests/adversarial/test_attacks.py on the sandbox."""

import logging

from slurm_charlie import log as charlie_log
from slurm_charlie.errors import UserError, format_message, printable

FORGED = ("evil\n2026-12-06T00:00:00 slurm-charlie[1]: job 1: info: prolog done"
          "\x1b[2J\r\u202eexe.txt\udcff\x85\x00\t")


def test_printable_escapes_what_forges_lines_or_drives_terminals():
    text = printable(FORGED)
    assert text == ("evil\\n2026-12-06T00:00:00 slurm-charlie[1]: job 1: info: prolog done"
                    "\\x1b[2J\\r\\u202eexe.txt\\udcff\\x85\\x00\\t")
    assert text.isprintable()
    # what people write stays as it is: accents, other scripts, quotes
    for fine in ("image café/ü.sqfs", "镜像 'x' \"y\" $HOME \\n"):
        assert printable(fine) == fine
    assert printable("x" * 5000, 100) == "x" * 100 + "... (4900 more characters)"


def test_an_error_is_two_lines_at_most_whatever_its_value():
    err = UserError("--charlie-image", "unsafe tarball: absolute member path",
                    f"/a.tgz: /{FORGED}", hint=f"repack {FORGED}")
    lines = format_message(err, 7, pid=1).split("\n")
    assert len(lines) == 2 and all(line.isprintable() for line in lines), lines
    assert lines[0].startswith("slurm-charlie[1]: job 7: error: --charlie-image: unsafe")
    assert lines[1].startswith("slurm-charlie[1]: job 7: hint: repack evil\\n2026")


def test_the_node_log_gets_one_line_per_event(tmp_path):
    path = tmp_path / "node.log"
    charlie_log.setup(job_id="7", stderr=False, node_log=str(path))
    try:
        charlie_log.log.info("image %s: %s", FORGED, "y" * 10000)
        charlie_log.log.error("plain")
    finally:
        charlie_log.flush()
        for h in list(charlie_log.log.handlers):
            h.close()
        charlie_log.log.handlers.clear()
    lines = path.read_text().splitlines()
    assert len(lines) == 2, lines
    assert "image evil\\n2026-12-06T00:00:00 slurm-charlie[1]" in lines[0]
    assert lines[0].endswith("more characters)") and len(lines[0]) < 4200
    assert all(line.isprintable() for line in lines)
    assert lines[1].endswith("job 7: error: plain")
    assert logging.getLogger("slurm_charlie") is charlie_log.log
