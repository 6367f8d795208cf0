"""Small records that cross stage boundaries: paths, digests and metrics, never tensors."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from longshort.io import atomic_write_text

RECORD_FILE = "record.json"


@dataclass(frozen=True)
class StageRecord:
    stage: str
    key: str
    path: str  # the stage's artifact folder
    outputs: dict[str, str] = field(default_factory=dict)  # name -> file or folder
    digests: dict[str, str] = field(default_factory=dict)  # name -> content digest
    metrics: dict[str, float] = field(default_factory=dict)
    flow_run_id: str | None = None  # the flow run that computed it
    duration_s: float = 0.0

    def save(self) -> None:
        """Written last, atomically: a folder with a record holds a finished stage."""
        atomic_write_text(Path(self.path) / RECORD_FILE, json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: Path) -> StageRecord | None:
        path = Path(folder) / RECORD_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))
