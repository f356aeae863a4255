"""Log set-up of a sharedpool process (``sharedpool serve``): text or JSON lines on stderr.

``text``: ``2024-05-01 12:00:00,123 INFO sharedpool.manager[4242]: message``.

``json``: one object per line, for log shippers::

    {"ts": "2024-05-01T12:00:00.123Z", "level": "INFO", "logger": "sharedpool.manager",
     "pid": 4242, "message": "...", "exc_info": "Traceback ..."}

``exc_info`` (and ``stack_info``) appear only when the record has them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Marks the handler we install, so that a second call replaces it instead
# of adding another (and each line would be printed twice).
_OURS = "_sharedpool_handler"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; newlines in messages are escaped, so one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            # Cached on the record like logging.Formatter does, so that other
            # handlers do not format the traceback again.
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        # default=str: a message argument that json cannot encode has already
        # been turned into text by getMessage(); this guards any other field.
        return json.dumps(entry, default=str)


def setup_logging(level: str, fmt: str) -> None:
    """Send log records to stderr as ``fmt`` ("text" or "json"); calling it again replaces, not adds.

    The handler sits on the root logger, so warnings of the libraries we
    use (redis-py, asyncio) are printed in the same format. ``level``
    applies to the ``sharedpool`` loggers; other libraries stay at WARNING
    or above, so ``DEBUG`` debugs sharedpool, not everything it imports.
    """
    name = level.upper()
    if name not in LEVELS:
        raise ValueError(f"log level {level!r}: one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: one of {', '.join(FORMATS)}")
    numeric = logging.getLevelName(name)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    setattr(handler, _OURS, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.WARNING))
    ours = logging.getLogger("sharedpool")
    ours.setLevel(numeric)
    # Records of sharedpool.* reach the root's handler by propagation; a
    # level on the root logger does not filter propagated records.
    ours.propagate = True
