"""The `patchcore-edge` command: one group, each part of the toolkit adds its commands.

Command modules import torch only inside the export commands, so the runtime commands work without it.
"""

from __future__ import annotations

from typing import Optional

import click

from .. import __version__
from ..fleet.cli import fleet_group
from ..imageio import ImageLimits, get_limits, set_limits
from .calibrate import calibrate_command
from .devices import devices_group, engine_group
from .eval import eval_command
from .export import export_command
from .run import run_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="patchcore-edge")
@click.option("--max-image-pixels", type=click.IntRange(1), default=None, metavar="N",
              help="Refuse images whose header declares more pixels (default 100,000,000).")
@click.option("--max-aspect-ratio", type=click.FloatRange(1.0), default=None, metavar="R",
              help="Refuse images longer than R:1 (default 20).")
def main(max_image_pixels: Optional[int], max_aspect_ratio: Optional[float]) -> None:
    """PatchCore anomaly detection from a workstation to NVIDIA Jetson boards."""
    if max_image_pixels is not None or max_aspect_ratio is not None:
        default = get_limits()
        set_limits(ImageLimits(max_image_pixels or default.max_pixels, max_aspect_ratio or default.max_aspect))


main.add_command(export_command, "export")
main.add_command(run_command, "run")
main.add_command(eval_command, "eval")
main.add_command(calibrate_command, "calibrate")
main.add_command(devices_group, "devices")
main.add_command(engine_group, "engine")
main.add_command(fleet_group, "fleet")
