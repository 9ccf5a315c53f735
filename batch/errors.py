"""The exception types for what a user can fix or must know, and the exit codes.

A user-fixable mistake is raised where it is found, with the file and the field, and turned into
one line and an exit code at the CLI edge (see cli.main) -- never caught and re-worded on the way.
"""

EXIT_OK = 0
EXIT_FAILED = 1  # a crash, or a merge that found missing chunks
EXIT_USAGE = 2  # JobError: the user's job file, input, paths or checkpoint
EXIT_IO = 74  # EX_IOERR: a write failed (a full disk): committed rows are kept; free space and rerun
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after checkpointing; rerun to resume


class JobError(Exception):
    """A user-fixable problem. str(error) is the whole message shown to the user."""

    exit_code = EXIT_USAGE


class IncompleteError(JobError):
    """merge (or a finished shard) found chunks that are not done yet."""

    exit_code = EXIT_FAILED


class WriteError(JobError):
    """Writing a file failed (no space left, quota, I/O error). Nothing committed is lost."""

    exit_code = EXIT_IO


JOINED_MAX = 300  # characters of a library's message joined into one line (two schemas could be kilobytes)


def first_line(e: BaseException) -> str:
    """A library's message as one line: its first line, or, where that ends in `:`, its lines joined
    (what follows is the point, e.g. a list of what was tried), up to JOINED_MAX characters."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    if not lines[0].endswith(":"):
        return lines[0]
    joined = " ".join(lines)
    return joined if len(joined) <= JOINED_MAX else joined[: JOINED_MAX - 1] + "…"
