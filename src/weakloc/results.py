"""The base of weakloc's typed results: dataclasses with ``to_dict()`` for JSON.

Compute functions (``evaluate``, ``calibrate``, ``localize``, counting evaluation, ...) return
subclasses; their fields are read as attributes. ``result["key"]`` reads ``to_dict()["key"]``, so
code written against the earlier plain-dict reports keeps working.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class Result:
    """Mixin for a result dataclass: ``to_dict()`` (plain JSON-ready values) and read-only item access."""

    def to_dict(self) -> dict:
        """The result as plain dicts, lists and numbers (what the command writes as JSON)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def keys(self):
        return self.to_dict().keys()
