"""Client JSON (HTTP bodies, WebSocket frames) -> Python values, every malformed input a 400.

Two inputs get past a plain json.loads as something other than a client error: nesting deeper than
Python's recursion limit ("[" x 100000) raises RecursionError, not ValueError; and a lone UTF-16
surrogate ("\\ud800") parses into a str that no UTF-8 encoder accepts, so it failed later, where
the text is tokenised or pickled, as a 500.
"""
from __future__ import annotations

import json
from typing import Optional, Union

from light_tts.server.io_struct import RequestError


def loads(data: Union[str, bytes], what: str) -> object:
    """`data` parsed; `what` names it in the 400 ("request body", "message")."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise RequestError(400, f"{what}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError):   # JSONDecodeError is a ValueError
        raise RequestError(400, f"{what} is not valid JSON") from None
    where = lone_surrogate(value)
    if where is not None:
        raise RequestError(400, f"{what}: {where} holds a lone UTF-16 surrogate, which is not text")
    return value


def lone_surrogate(value: object) -> Optional[str]:
    """Where in a parsed JSON value a string (key or value) cannot be UTF-8 ("field 'x'", "a key",
    "the text"), or None. Iterative: the value may be as deep as the parser allowed."""
    stack = [(value, "the text")]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(v, dict):
            for k, item in v.items():
                stack.append((k, "a key"))
                stack.append((item, f"field {k!r}"))
        elif isinstance(v, list):
            stack.extend((item, where) for item in v)
    return None
