"""Logging of the `lorax-server` commands, with the standard library's logging module.

Records go to stdout, as upstream's do: this package's at the level asked for (`--logger-level`), other
libraries' from WARNING up. With `--json-output` every record is one line of JSON in the shape of
loguru's serialized records, which is what the LoRAX launcher parses to re-log a shard's lines at their
level (launcher/src/main.rs, PythonLogMessage: `text` and `record.level.name`):

    {"text": "server.py:280 serving on unix:///tmp/lorax-0\\n",
     "record": {"time": {"repr": "...", "timestamp": ...}, "level": {"name": "INFO", "no": 20, "icon": ""},
                "name": "lorax_server.server", "message": "serving on ...", "exception": null, ...}}

`record.exception` is null or {"type", "value", "traceback"} (the formatted traceback); the traceback is
also part of `text`, as in loguru.
"""

import json
import logging
import os
import sys
import threading
import time
from datetime import datetime
from typing import Optional, TextIO, Union

PACKAGE = "lorax_server"
TRACE, SUCCESS = 5, 25
# loguru's level names: the launcher knows exactly these (any other name makes it log the line as DEBUG).
LEVELS = {"TRACE": TRACE, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "SUCCESS": SUCCESS,
          "WARNING": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}
_START = time.time()

logging.addLevelName(TRACE, "TRACE")
logging.addLevelName(SUCCESS, "SUCCESS")


def parse_level(level: Union[str, int]) -> int:
    """A level name (any case; loguru's names and the standard ones) or number -> its number."""
    if isinstance(level, int):
        return level
    text = str(level).strip()
    if text.isdigit():
        return int(text)
    name = ALIASES.get(text.upper(), text.upper())
    if name not in LEVELS:
        raise ValueError(f"unknown level '{level}'; one of {', '.join(LEVELS)}")
    return LEVELS[name]


def level_name(levelno: int) -> str:
    """The loguru name of the highest level at or below `levelno` (TRACE below that)."""
    return max(((no, name) for name, no in LEVELS.items() if no <= levelno), default=(TRACE, "TRACE"))[1]


class JsonFormatter(logging.Formatter):
    """One line of JSON per record, shaped like loguru's serialized records (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        text = f"{record.filename}:{record.lineno} {message}"
        exception = None
        if record.exc_info and record.exc_info[0] is not None:
            trace = self.formatException(record.exc_info)
            kind, value = record.exc_info[0], record.exc_info[1]
            exception = {"type": kind.__name__, "value": str(value), "traceback": trace}
            text += "\n" + trace
        elif record.exc_text:
            exception = {"type": None, "value": None, "traceback": record.exc_text}
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        when = datetime.fromtimestamp(record.created).astimezone()
        elapsed = record.created - _START
        name = level_name(record.levelno)
        payload = {
            "text": text + "\n",
            "record": {
                "elapsed": {"repr": f"{elapsed:.6f}s", "seconds": elapsed},
                "exception": exception,
                "extra": {},
                "file": {"name": record.filename, "path": record.pathname},
                "function": record.funcName,
                "level": {"icon": "", "name": name, "no": LEVELS[name]},
                "line": record.lineno,
                "message": message,
                "module": record.module,
                "name": record.name,
                "process": {"id": record.process, "name": record.processName},
                "thread": {"id": record.thread, "name": record.threadName},
                "time": {"repr": when.isoformat(sep=" "), "timestamp": record.created},
            },
        }
        return json.dumps(payload, default=str)


class _LevelByOrigin(logging.Filter):
    """This package's records at `level`, everyone else's at WARNING or above (upstream shows only its own)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == PACKAGE or record.name.startswith(PACKAGE + ".")
        return record.levelno >= (self.level if ours else max(self.level, logging.WARNING))


_HANDLER_MARK = "_lorax_server_handler"
_lock = threading.Lock()


def setup_logging(level: Union[str, int] = "INFO", json_output: bool = False,
                  stream: Optional[TextIO] = None) -> logging.Handler:
    """Sends log records to `stream` (stdout) as text or JSON lines; replaces any handler an earlier call
    installed. Python warnings are logged too (as `py.warnings` records), so that with `json_output` every
    line on stdout is JSON. Returns the handler."""
    levelno = parse_level(level)
    handler = logging.StreamHandler(stream or sys.stdout)
    setattr(handler, _HANDLER_MARK, True)
    if json_output:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_LevelByOrigin(levelno))
    with _lock:
        root = logging.getLogger()
        for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
            root.removeHandler(old)
        root.addHandler(handler)
        root.setLevel(max(levelno, logging.WARNING))
        logging.getLogger(PACKAGE).setLevel(levelno)
    logging.captureWarnings(True)
    if json_output:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # progress bars are not log lines
    return handler
