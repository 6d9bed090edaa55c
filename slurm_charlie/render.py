"""Text made from templates and tables: the shim's C option header, the
option and config references in docs/, the hook dispatchers, the sandbox's
slurm.conf.  Pure: inputs -> text.  Used by cli.py (`gen`), install.py and
sandbox.py, none of which import each other for it."""

from __future__ import annotations

from . import config, options


def render(template: str, **kw) -> str:
    import jinja2
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("slurm_charlie", "templates"),
        keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return env.get_template(template).render(**kw)


def c_str(value: str | None) -> str:
    if value is None:
        return "NULL"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_header() -> str:
    from . import asroot, layout
    return render("charlie_options.h.j2", options=options.OPTIONS,
                  max_dirs=options.MAX_DIRS, c_str=c_str,
                  run_dir=layout.RUN_DIR, shim_files=layout.SHIM_FILES,
                  setup_dir=asroot.SETUP_DIR,
                  on_host_var=layout.ON_HOST_VAR)


def render_root_ops_rst() -> str:
    """The security model's table of root's operations, from the closed list
    (slurm_charlie/asroot/__init__.py: OPERATIONS)."""
    from . import asroot
    rows = [f"   * - ``{name}``\n     - ``asroot/{room}.py``\n     - {what}"
            for name, (room, _, what) in asroot.OPERATIONS.items()]
    return ("..\n   Generated from slurm_charlie/asroot/__init__.py by "
            "`slurm-charlie gen root-ops-rst`; do not edit.\n\n"
            ".. list-table:: Root's operations for a job (the closed list)\n"
            "   :header-rows: 1\n   :widths: 25 20 55\n\n"
            "   * - Name\n     - Room\n     - What root does\n" + "\n".join(rows) + "\n")


def render_options_rst() -> str:
    return render("options.rst.j2", options=options.OPTIONS)


def render_config_rst() -> str:
    rows = []
    for k in config.DEFAULTS:
        default = repr(k.default) if not isinstance(k.default, bool) else str(k.default).lower()
        if isinstance(k.default, str):
            default = f'"{k.default}"'
        choices = f" One of: {', '.join(k.choices)}." if k.choices else ""
        rows.append(f"   * - ``{k.name}``\n     - ``{default}``\n     - {k.help}.{choices}")
    return ("Configuration reference\n=======================\n\n"
            ".. Generated from slurm_charlie/config.py by `slurm-charlie gen config-rst`.\n\n"
            f"The site config is TOML, read from ``${config.ENV_VAR}`` or else "
            f"``{config.DEFAULT_PATH}``. Keys with a dot live in the section "
            "before the dot (``vm.accel`` is ``accel`` under ``[vm]``). Unknown "
            "keys and wrong types are refused; ``slurm-charlie config check`` "
            "shows the effective values and where each comes from.\n\n"
            ".. list-table::\n   :header-rows: 1\n   :widths: 25 25 50\n\n"
            "   * - Key\n     - Default\n     - Meaning\n" + "\n".join(rows) + "\n\n"
            "The same, as a commented file (``docs/charlie.toml.example``):\n\n"
            ".. literalinclude:: charlie.toml.example\n   :language: toml\n")
