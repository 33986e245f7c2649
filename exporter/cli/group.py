"""A click Group whose --help lists commands by task, each with its full one-line description."""
from __future__ import annotations

import click

# Sections in the order --help prints them; a command names its section when it is registered.
SECTIONS = {
    "start": "Get started",
    "export": "Export (checkpoint -> ONNX bundle -> precision -> TensorRT engines)",
    "run": "Run a bundle",
    "check": "Check and measure",
    "deploy": "Deploy",
    "tools": "Tools",
}


class SectionedGroup(click.Group):
    """Commands registered with `section=` are listed under that heading; descriptions are never cut."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sections: dict[str, str] = {}

    def command(self, *args, section: str = "tools", **kwargs):
        """Like click.Group.command, and files the command under `section` (a key of SECTIONS)."""
        if section not in SECTIONS:
            raise ValueError(f"unknown help section {section!r}")
        decorator = super().command(*args, **kwargs)

        def register(f):
            cmd = decorator(f)
            self.sections[cmd.name] = section
            return cmd

        return register

    def group(self, *args, section: str = "tools", **kwargs):
        """Like click.Group.group, filed under `section`."""
        decorator = super().group(*args, **kwargs)

        def register(f):
            grp = decorator(f)
            self.sections[grp.name] = section
            return grp

        return register

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """One block per section, commands in registration order, each with its first docstring line in full."""
        by_section: dict[str, list[tuple[str, str]]] = {key: [] for key in SECTIONS}
        for name in self.commands:  # dicts keep registration order: the order a task goes in
            cmd = self.get_command(ctx, name)
            if cmd is None or cmd.hidden:
                continue
            by_section[self.sections.get(name, "tools")].append((name, cmd.get_short_help_str(limit=10_000)))
        for key, rows in by_section.items():
            if rows:
                with formatter.section(SECTIONS[key]):
                    formatter.write_dl(rows)
