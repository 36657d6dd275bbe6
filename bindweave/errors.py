"""The one error type users see: it names the file or field that is wrong and how to fix it."""

import functools


class BindWeaveInputError(Exception):
    """Bad input (file, field, folder, layout). Entry points print it once and exit non-zero."""


def report_input_error(error: BindWeaveInputError) -> None:
    """The one way an entry point shows a bad input: a log line and one ``error:`` line on stderr."""
    import logging
    import sys

    # The log file keeps it; the console shows only the `error:` line (see hydra_support.FileOnly).
    logging.getLogger("bindweave").error("%s", error, extra={"file_only": True})
    print(f"error: {error}", file=sys.stderr)


def exits_2_on_input_error(command):
    """A single-writer entry point (stages 1 and 2): a bad input is reported once, exit code 2."""

    @functools.wraps(command)
    def run(*args, **kwargs) -> int:
        try:
            return command(*args, **kwargs)
        except BindWeaveInputError as error:
            report_input_error(error)
            return 2

    return run
