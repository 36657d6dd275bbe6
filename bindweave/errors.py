"""The one error type users see: it names the file or field that is wrong and how to fix it."""


class BindWeaveInputError(Exception):
    """Bad input (file, field, folder, layout). Entry points print it once and exit non-zero."""
