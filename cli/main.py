"""The `flowgrad` command group."""

from __future__ import annotations

import click

from .common import Group, run_program, setup_logging
from .demo import demo
from .edit import edit
from .inspect_store import inspect_store


@click.group(cls=Group)
@click.option("-v", "--verbose", is_flag=True, help="Log what is being done.")
@click.version_option(package_name="flowgrad")
def flowgrad(verbose: bool) -> None:
    """Steer frozen rectified flows with gradients (FlowGrad) and manage semantic directions."""
    setup_logging(verbose)


flowgrad.add_command(demo)
flowgrad.add_command(edit)
flowgrad.add_command(inspect_store)


def main() -> None:
    """Console-script entry point (see :func:`cli.common.run_program`)."""
    run_program(flowgrad)


if __name__ == "__main__":  # python -m cli.main
    main()
