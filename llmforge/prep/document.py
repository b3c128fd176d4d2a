"""The unit that flows through the data stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """Text with a stable id (e.g. the WARC record id or a file path) and free-form metadata.

    Metadata keys in use: url, date, source (input file), content_type, charset, language, language_score.
    """

    text: str
    id: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "metadata": self.metadata}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Document:
        return cls(text=obj["text"], id=obj["id"], metadata=obj.get("metadata", {}))
