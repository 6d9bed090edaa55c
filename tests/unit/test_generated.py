"""Files generated from the one option table and the config defaults must be
current: the shim's C header and the docs."""

import os

import pytest

from slurm_charlie import config, render

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

GENERATED = {
    "spank/charlie_options.h": render.render_header,
    "docs/options.rst": render.render_options_rst,
    "docs/config.rst": render.render_config_rst,
    "docs/root-operations.rst": render.render_root_ops_rst,
    "docs/charlie.toml.example": config.render_example,
}


@pytest.mark.parametrize("path", sorted(GENERATED))
def test_generated_file_is_current(path):
    with open(os.path.join(ROOT, path)) as f:
        assert f.read() == GENERATED[path](), f"{path} is stale: run `make docs-gen`"


def test_header_has_every_option():
    from slurm_charlie import options
    header = render.render_header()
    for o in options.OPTIONS:
        assert f'"{o.flag[2:]}"' in header
    assert f"#define CHARLIE_MAX_DIRS {options.MAX_DIRS}" in header
