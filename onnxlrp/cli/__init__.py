"""The onnxlrp command line: ``onnxlrp explain | layers | rules | export | check``.

``main`` is the console-script entry point (``onnxlrp = "onnxlrp.cli:main"``); the click group is
``onnxlrp.cli.app.cli``.
"""
from __future__ import annotations


def main(argv=None, standalone_mode=True):
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``).

    With ``standalone_mode=True`` (the console script) this exits the process with the command's exit
    code: 0 success, 1 a model or input problem, 2 a usage error. With ``standalone_mode=False`` it
    returns the exit code instead.
    """
    import click

    from .app import cli
    if standalone_mode:
        return cli.main(args=argv, prog_name="onnxlrp")
    try:
        rv = cli.main(args=argv, prog_name="onnxlrp", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1


__all__ = ["main"]


# The commands' modules import app, which imports them at its end to register them: importing app first
# lets `import onnxlrp.cli.explain` (or audit, dataset) work on its own.
from . import app as _app  # noqa: E402,F401
