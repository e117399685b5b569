"""Result files written atomically: a run killed mid-write (by a time limit, say) leaves the last
complete file in place, never half of one."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomically(path: str | os.PathLike, data) -> None:
    """Write `data` as indented JSON to `path` through a temporary file beside it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
