"""The ``relabel-shards`` command line: a click group whose commands map options onto library calls.

Each command parses its options, calls one library function with the same argument names, and turns the
library's errors (``ValueError``, ``FileNotFoundError``, ...) into a one-line ``click.ClickException``.
Library modules are imported inside the commands so that ``relabel-shards --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps

import click

from relabel_shards import __version__

# Library errors a user can act on: shown as one line, exit code 1, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, ImportError,
                                                 RuntimeError, OSError)


def user_errors(fn: Callable) -> Callable:
    """Run a command body, turning the library's user-facing errors into ``click.ClickException``."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from e

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="relabel-shards")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """ReLabel-style localized soft targets, stored beside the JPEGs in WebDataset shards.

    \b
    build    annotate images with a timm classifier and write label-map shards
    convert  import the official ReLabel release (one .pt file per image)
    info     what a dataset's _info.json says
    verify   read every shard and check it against _info.json
    show     draw an image with heatmaps of its top classes
    demo     build shards from bundled real photos on the CPU and draw them
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


# ---- build / demo (issue 3) -------------------------------------------------------------------------

# ---- info / verify / show (issue 3) -----------------------------------------------------------------

# ---- convert (issue 6) ------------------------------------------------------------------------------

# ---- pool: a short LabelPooling demo (issue 2) ------------------------------------------------------


def main() -> None:
    cli(prog_name="relabel-shards")


if __name__ == "__main__":
    main()
