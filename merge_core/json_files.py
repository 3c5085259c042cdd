"""JSON that adapters and models ship (configs, indexes, safetensors headers), read defensively.

``json.loads`` fails in more ways than JSONDecodeError on hostile input: a deep nesting raises
RecursionError, a 5,000-digit number a plain ValueError, invalid UTF-8 a UnicodeDecodeError. Every
one of them is turned into one JsonFormatError here, so each caller words a single refusal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonFormatError(ValueError):
    """The text is not JSON that PEFT or transformers could read; the message says why, as a clause."""


def parse_json(data: str | bytes) -> Any:
    """``json.loads`` whose every failure is a JsonFormatError (a clause such as "it is not valid JSON (...)")."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text)
    except UnicodeDecodeError as exc:
        raise JsonFormatError(f"it is not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("Unexpected UTF-8 BOM"):
            # PEFT and transformers read these files as plain UTF-8, and refuse the mark as well.
            raise JsonFormatError("it starts with a byte-order mark, which PEFT and transformers refuse") from None
        raise JsonFormatError(f"it is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise JsonFormatError("it nests lists or objects too deeply to be read") from None
    except ValueError:  # Python's limit on the digits of an integer literal
        raise JsonFormatError("it holds a number too long to be read") from None


def read_json_file(path: Path) -> Any:
    """The parsed content of ``path``; OSError as the system raised it, every format problem a JsonFormatError."""
    return parse_json(Path(path).read_bytes())


__all__ = ["JsonFormatError", "parse_json", "read_json_file"]
