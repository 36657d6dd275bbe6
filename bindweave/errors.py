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


SHOWN_KEYS = 8


def refuse_incomplete_load(loading_info: dict, what: str, fix: str, ignorable: tuple[str, ...] = ()) -> None:
    """The one strict check after a library's ``from_pretrained(..., output_loading_info=True)``
    (diffusers and transformers only warn, and keep random weights where keys are missing):
    missing keys, unexpected keys or wrong shapes are one error naming ``what`` (the folder) and
    the first keys, then ``fix``. ``ignorable``: prefixes of checkpoint keys the class does not use
    by design (e.g. a ``visual_projection`` saved beside a CLIP vision tower), which cannot change
    its outputs."""
    unexpected = [key for key in loading_info.get("unexpected_keys") or () if not key.startswith(ignorable)]
    found = {"missing keys": loading_info.get("missing_keys") or (), "unexpected keys": unexpected,
             "wrong shapes": loading_info.get("mismatched_keys") or ()}
    problems = [f"{label}: {sorted(map(str, keys))[:SHOWN_KEYS]}" for label, keys in found.items() if keys]
    if problems:
        raise BindWeaveInputError(f"{what} does not match its config.json ({'; '.join(problems)}): {fix}")
