"""`python -m bridge_export.exporter.cli`: the same as the `bridge-export` command."""
from bridge_export.exporter.cli import main

main(prog_name="bridge-export")
