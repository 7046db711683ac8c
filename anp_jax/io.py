"""Reading and writing the small JSON files of a run (``metrics.json``, ``config.json``).

Paths go through ``etils.epath`` (as Orbax's do), so a ``gs://`` workdir works like a local
one.  Writes are atomic, so a reader never sees a half-written file and a crash leaves the
old one: on a file system the text goes to a temporary file next to the target, which is then
renamed over it; on an object store (``gs://``, ``s3://``) an upload is atomic by itself and a
rename is a copy and a delete, so the object is written directly.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from etils import epath

PathLike = str | epath.PathLike


def jsonable(obj: Any) -> Any:
    """``obj`` in plain JSON types: numpy scalars and arrays become Python numbers and lists,
    tuples lists, non-finite floats ``None``, dict keys strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


_OBJECT_STORES = ("gs://", "s3://")


def write_text_atomic(path: PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically: through ``.<name>.tmp`` and a rename on a file
    system, directly on an object store (where an upload is atomic)."""
    path = epath.Path(path)
    if str(path).startswith(_OBJECT_STORES):
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json_atomic(path: PathLike, obj: Any, indent: int | None = 2) -> None:
    """Writes ``jsonable(obj)`` to ``path`` atomically (``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(jsonable(obj), indent=indent) + "\n")


def read_json(path: PathLike) -> Any:
    """The JSON in ``path``; ``OSError`` or ``ValueError`` (``json.JSONDecodeError``) else."""
    return json.loads(epath.Path(path).read_text())
