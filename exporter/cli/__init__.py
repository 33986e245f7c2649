"""The `bridge-export` command line, organised by task: a thin layer over the Python API.

`main` is the root group (app.py); each module registers one section's commands on it:
export_cmds (onnx, precision, random-checkpoint, engine), run_cmds (caption, classify, embed),
check_cmds (verify, inspect, bench, bench-load), deploy_cmds (serve, triton-repo), tools_cmds
(demo and `tools ...`). Nothing here imports torch at module level: the base install's commands
must run without it.
"""
from bridge_export.exporter.cli.app import main
from bridge_export.exporter.cli import export_cmds, run_cmds, check_cmds, deploy_cmds, tools_cmds  # noqa: F401  (register)
from bridge_export.exporter.cli.common import EXTRAS, USER_ERRORS, friendly, missing_extra

__all__ = ["main", "friendly", "missing_extra", "EXTRAS", "USER_ERRORS"]
