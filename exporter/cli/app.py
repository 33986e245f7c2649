"""The `bridge-export` root group: global options, logging set up once for every command."""
from __future__ import annotations

import click

from bridge_export.exporter.cli.group import SectionedGroup


@click.group(cls=SectionedGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="bridge-export", message="%(version)s")
@click.option("--debug", is_flag=True, help="show full tracebacks for errors")
@click.option("-v", "--verbose", is_flag=True, help="also show third-party logs (onnxruntime, Triton, Ray) and "
                                                    "debug messages")
@click.option("-q", "--quiet", is_flag=True, help="show warnings and errors only")
def main(debug, verbose, quiet):
    """Export InternVL-14B (InternVL-C / InternVL-G) to ONNX and TensorRT, and run the result.

    A typical run: `bridge-export onnx --checkpoint OpenGVLab/InternVL-14B-224px --out b`, then
    `bridge-export verify b --checkpoint ...`, then `bridge-export caption b photo.jpg`.
    """
    import logging

    from bridge_export.runtime.progress import log_to_stderr, quiet_third_party, set_verbose

    log_to_stderr(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    set_verbose(verbose)
    if not verbose:
        quiet_third_party()
