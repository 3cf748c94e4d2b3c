"""Entry point: the click group and the one place errors become exit codes."""

from __future__ import annotations

import contextlib
import errno
import os
import sys

import click

from ftkit import __version__
from ftkit.cli import (
    compose_cmds,
    config_cmds,
    engine_cmds,
    image_cmds,
    lease_cmds,
    observe_cmds,
    power_cmds,
    run_cmds,
)
from ftkit.errors import FtkitError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ftkit")
def cli() -> None:
    """Fine-tune LLMs on one or a few GPUs, reproducibly, and get the result served."""


for module in (config_cmds, image_cmds, engine_cmds, run_cmds, compose_cmds, power_cmds, lease_cmds, observe_cmds):
    for command in module.COMMANDS:
        cli.add_command(command)


def _reader_left() -> None:
    """`ftkit plan | head`: the reader left, so there is nothing to say and nothing went wrong.

    Later writes (and the flush at exit) go to /dev/null instead of raising again."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="ftkit", standalone_mode=False)
    except SystemExit as e:
        # click turns EPIPE from a command into `sys.exit(1)` after wrapping stdout in its
        # flush-pacifying wrapper: that wrapper tells the pipe apart from a failure. Matched by
        # name (click 8.3 made the class private and deprecated its public alias).
        if e.code == 1 and type(sys.stdout).__name__ in ("_PacifyFlushWrapper", "PacifyFlushWrapper"):
            _reader_left()
        raise
    except FtkitError as e:
        from ftkit.text import terminal_safe

        click.echo(terminal_safe(e.render()), err=True)  # a path or a server's words in it: escaped
        sys.exit(e.exit_code)
    except OSError as e:
        if isinstance(e, BrokenPipeError):  # the pipe broke outside click's own handling
            _reader_left()
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            from ftkit.text import printable

            where = f" writing {printable(str(e.filename))}" if e.filename else ""
            click.echo(f"ftkit: no space left on the device{where} ({e.strerror}); free some and run it again",
                       err=True)
            sys.exit(1)
        if e.errno != errno.ENAMETOOLONG:
            raise
        # a path the kernel refuses by its length, wherever it was built (a name from a recipe, a profile's
        # path): the flags are checked when read (ftkit.cli.params), this names the rest in one line
        from ftkit.strict import describe_too_long

        click.echo(describe_too_long(e), err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except BaseException as e:  # a run's signal gate raised outside a run's own handling
        from ftkit.run.signals import Interrupted

        if isinstance(e, Interrupted):
            click.echo(f"interrupted by {e.name}", err=True)
            sys.exit(e.exit_code)
        raise
    sys.exit(0)


if __name__ == "__main__":
    main()
