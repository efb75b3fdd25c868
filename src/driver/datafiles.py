"""Reading dataset files: JSON and JSONL rows, with errors that name the file and the line.

Every task's data (`driver.countdown_data` for Countdown, `driver.task_data` for the others) is read
through here, and every malformed file or row raises `DatasetError` (or a subclass) naming the file, the
row or line, and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DatasetError(ValueError):
    """A data file or row is malformed or missing; the message names the file, row and field."""


def read_json(path: Path) -> Any:
    """The parsed JSON document in `path`.

    Raises:
        DatasetError: not valid JSON (with the parser's position). OSError: unreadable.
    """
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON: {e}") from e


def read_jsonl(path: Path) -> list[Any]:
    """The rows of a JSON Lines file (one JSON value per line; blank lines skipped), in order.

    Raises:
        DatasetError: a line is not valid JSON (named by its 1-based number). OSError: unreadable.
    """
    rows = []
    for number, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: line {number + 1}: not valid JSON: {e}") from e
    return rows
