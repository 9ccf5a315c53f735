"""The one exception type for mistakes a user can fix (bad job file, bad input, bad paths).

It is raised where the mistake is found, with the file and the field, and turned into one line and
exit code 2 at the CLI edge (see cli.main) -- never caught and re-worded on the way.
"""

EXIT_OK = 0
EXIT_FAILED = 1  # a crash, or a merge that found missing chunks
EXIT_USAGE = 2  # JobError: the user's job file, input or paths
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after checkpointing; rerun to resume


class JobError(Exception):
    """A user-fixable problem. str(error) is the whole message shown to the user."""

    exit_code = EXIT_USAGE


class IncompleteError(JobError):
    """merge (or a finished shard) found chunks that are not done yet."""

    exit_code = EXIT_FAILED
