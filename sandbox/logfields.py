"""Structured log fields: ``log.info("msg", extra=kv(container=cid))``.

The shim's formatter (``shim/log.py``) renders the fields of `FIELDS_ATTR` as
``key=value`` pairs after the message; any logging handler ignores them harmlessly.
"""

from __future__ import annotations

from typing import Any

#: The LogRecord attribute that carries the fields.
FIELDS_ATTR = "kv"


def kv(**fields: object) -> dict[str, Any]:
    """The ``extra=`` argument that attaches ``fields`` to one log line."""
    return {FIELDS_ATTR: fields}
