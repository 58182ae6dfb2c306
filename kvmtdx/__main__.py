"""`python -m kvmtdx` and the installed `kvmtdx` script.

The command line is imported inside `entry`, so a Ctrl-C while it loads is one line and
exit 130 like any other interruption, not a traceback.
"""

import sys


def entry() -> int:
    try:
        from kvmtdx.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("kvmtdx: interrupted\n")
        return 130  # kvmtdx.errors.ExitCode.INTERRUPTED, not imported yet
    return main()


if __name__ == "__main__":
    sys.exit(entry())
