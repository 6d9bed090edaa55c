"""The AdminComment part (slurm_charlie/accounting.py): what it records,
that it keeps other tools' text, that nothing in a user's image name can
forge or break it, and how `slurm-charlie jobs` reads sacct's lines."""

import os

from slurm_charlie import accounting, options

DIGEST = "a" * 64


def _opts(**kw):
    return options.Options(**{"type": "container", **kw})


def test_a_registry_image_records_its_pinned_digest():
    e = accounting.entry(_opts(image=f"docker://reg:5000/x/y@sha256:{DIGEST}"))
    assert e == accounting.Entry("container", f"docker://reg:5000/x/y@sha256:{DIGEST}",
                                 f"sha256:{DIGEST}")


def test_an_archive_records_the_sha256_hashed_at_submit():
    st = os.stat("/")
    e = accounting.entry(_opts(image="/home/u/img.tar.gz",
                               image_digest=options.image_digest(DIGEST, st)))
    assert e.digest == f"sha256:{DIGEST}"


def test_a_directory_or_vm_image_has_no_digest_and_type_none_no_image():
    assert accounting.entry(_opts(image="/home/u/dir")).digest == "none"
    assert accounting.entry(_opts(type="none")) == accounting.Entry("none", "none", "none")


def test_other_text_is_kept_and_ours_replaced_on_a_second_prolog():
    e1 = accounting.Entry("vm", "/a.qcow2", "none")
    e2 = accounting.Entry("vm", "/b.qcow2", "none")
    once = accounting.merge("site: project 42", e1)
    assert once == "site: project 42; charlie(type=vm image=/a.qcow2 digest=none)"
    twice = accounting.merge(once, e2)
    assert twice == "site: project 42; charlie(type=vm image=/b.qcow2 digest=none)"
    assert accounting.merge(None, e1) == accounting.part(e1)
    assert accounting.merge(accounting.merge("", e1), e1) == accounting.part(e1)


def test_an_image_name_cannot_forge_or_break_the_record():
    evil = "/home/u/x) charlie(type=vm image=/evil digest=sha256:00|3|x\n"
    text = accounting.merge(None, accounting.Entry("container", evil, "none"))
    assert text.count("charlie(") == 1 and "|" not in text and "\n" not in text
    assert accounting.parse(text) == accounting.Entry("container", evil, "none")


def test_a_long_text_of_another_tool_is_cut_not_ours():
    e = accounting.Entry("container", "/i", "none")
    text = accounting.merge("x" * 5000, e)
    assert len(text) <= accounting.MAX_LEN and text.endswith(accounting.part(e))


def test_sacct_lines_become_charlie_rows_only():
    part = accounting.part(accounting.Entry("container", "/i|j", f"sha256:{DIGEST}"))
    out = (f"12|chuser|COMPLETED|2026-12-07T10:00:00|2026-12-07T10:01:00|2|site|x; {part}\n"
           "13|chuser|FAILED|2026-12-07T10:02:00|2026-12-07T10:03:00|1|\n"
           "14|chuser|COMPLETED|x|y|1|charlie(type=none\n")
    rows = accounting.rows(out)
    assert [r["JobID"] for r in rows] == ["12"]
    assert rows[0]["image"] == "/i|j" and rows[0]["type"] == "container"
    table = accounting.format_rows(rows)
    assert table.splitlines()[0].split() == ["JOBID", "USER", "STATE", "START", "NODES",
                                             "TYPE", "DIGEST", "IMAGE"]
    assert table.splitlines()[1].split()[-1] == "/i|j"


def test_a_huge_image_name_is_cut_whole_escapes_kept():
    e = accounting.Entry("container", "/" + "é" * 2000, "none")
    text = accounting.merge("site", e)
    assert len(text) < accounting.MAX_LEN
    got = accounting.parse(text)
    assert got.image.endswith("...") and got.image.startswith("/é")
    assert "%" not in got.image  # no half escape left behind
