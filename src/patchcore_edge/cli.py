"""The `patchcore-edge` command: one group, each part of the toolkit adds its commands.

Command modules import torch only inside the export commands, so the runtime commands work without it.
"""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="patchcore-edge")
def main() -> None:
    """PatchCore anomaly detection from a workstation to NVIDIA Jetson boards."""


def _register() -> None:
    from .export.cli import export_command

    from .calibration.cli import calibrate_command
    from .devices.cli import devices_group, engine_group
    from .evaluation.cli import eval_command
    from .runtime.cli import run_command

    main.add_command(export_command, "export")
    main.add_command(run_command, "run")
    main.add_command(eval_command, "eval")
    main.add_command(calibrate_command, "calibrate")
    main.add_command(devices_group, "devices")
    main.add_command(engine_group, "engine")
    from .fleet.cli import fleet_group; main.add_command(fleet_group, "fleet")  # noqa: E702


_register()
