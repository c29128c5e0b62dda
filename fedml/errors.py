"""The one exception type for problems a user can fix."""


class FedmlError(Exception):
    """A problem caused by user input (config, data, model reference, run directory).

    The message says what is wrong and what to do about it. The CLI prints it without a
    traceback and exits with status 2.
    """
