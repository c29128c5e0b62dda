"""Why a site's task failed, as a short text that can travel and be counted.

A site that fails a task replies with Flower's `Error` (a code and a reason). The site
removes its local paths from the reason before it leaves (`without_paths`: a path may
name a patient folder or a user); the server counts a round's failures by reason
(`failure_reason`, bounded: a hostile site's reason is only text of a fixed size, and a
round keeps at most `MAX_REASONS` distinct ones) so the history row, the server's
console and `fedml runs` can say what went wrong, not only how often.
"""

from __future__ import annotations

import re

from flwr.app import Error

DECLINED_CODE = 4001  # Error.code of a client that declines to train: budget spent
POLICY_REFUSED_CODE = 4002  # Error.code of a site whose policy refuses the task
MAX_REASON_CHARS = 200
MAX_REASONS = 8  # distinct reasons per round; the rest count as OTHER_REASON
OTHER_REASON = "other reasons"

# An absolute POSIX or Windows path, or a home-relative one: up to the next blank or quote.
_PATH = re.compile(r"(?<![\w.])(?:~|[A-Za-z]:\\|/)[^\s'\"`,;:()\[\]{}<>]*")


def without_paths(text: str) -> str:
    """`text` with every absolute or home-relative path replaced by its last part in
    angle brackets (`/srv/site-a/visits.csv` -> `<visits.csv>`): the reason still says
    which file, not where it lives."""

    def last_part(match: re.Match[str]) -> str:
        parts = [p for p in re.split(r"[\\/]", match.group(0)) if p and p != "~"]
        return f"<{parts[-1]}>" if parts else "<path>"

    return _PATH.sub(last_part, text)


def failure_reason(error: Error) -> str:
    """A failed reply's reason as one bounded line (printable characters only); its
    error code when it gives no reason."""
    text = " ".join(str(error.reason or "").split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    if not text:
        return f"error code {error.code}"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."
