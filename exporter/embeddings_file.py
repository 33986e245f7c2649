"""`embed --out`: embeddings and the names they belong to, committed together as one file.

A pair of files (NAME.npy + NAME.npy.names.txt) can disagree after a kill or a full disk between
the two renames, and a text holding a newline shifts every name after it. So the output is one
file, written beside and renamed into place (bridge_export.exporter.output.atomic_file):

* `.npz`: arrays `embeddings` (float32 [N, D]), `names` and `kinds` (unicode [N]; any character,
  newlines included), read back with `read_embeddings` or `np.load(path)` (no pickle needed).
* `.parquet`: columns source, kind, embedding (needs pyarrow).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bridge_export.exporter.output import OutputError, atomic_file, check_output_file

SUFFIXES = (".npz", ".parquet")


def check_embeddings_out(out, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse, before any work, an embeddings output of the wrong kind, in the wrong place or existing."""
    out = Path(out)
    if out.suffix.lower() == ".npy":
        raise OutputError(f"{flag} {out.name}: a .npy file cannot hold the names its rows belong to; use "
                          f"{out.with_suffix('.npz').name} (embeddings, names and kinds in one file) or .parquet")
    out = check_output_file(out, overwrite, SUFFIXES, flag)
    if out.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as e:
            raise OutputError("writing .parquet needs pyarrow: pip install pyarrow, or use .npz") from e
    return out


def write_embeddings(out, embeddings: np.ndarray, names: list[str], kinds: list[str]) -> Path:
    """Write embeddings with their names and kinds as one file (replaced atomically); returns its path."""
    out = Path(out).absolute()
    embeddings = np.asarray(embeddings, np.float32)
    if not (len(names) == len(kinds) == embeddings.shape[0]):
        raise ValueError(f"{embeddings.shape[0]} embeddings but {len(names)} names and {len(kinds)} kinds")
    with atomic_file(out) as tmp:
        if out.suffix.lower() == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"source": names, "kind": kinds,
                                     "embedding": [list(map(float, e)) for e in embeddings]}), tmp)
        else:
            with open(tmp, "wb") as f:  # np.savez on a path would append .npz to a name without it
                np.savez(f, embeddings=embeddings, names=np.array(names, dtype=np.str_),
                         kinds=np.array(kinds, dtype=np.str_))
    return out


def read_embeddings(path) -> tuple[np.ndarray, list[str], list[str]]:
    """(embeddings [N, D], names, kinds) of a file `write_embeddings` wrote (.npz or .parquet)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        return (np.asarray(t.column("embedding").to_pylist(), np.float32), t.column("source").to_pylist(),
                t.column("kind").to_pylist())
    with np.load(path, allow_pickle=False) as z:
        return z["embeddings"], z["names"].tolist(), z["kinds"].tolist()


__all__ = ["check_embeddings_out", "write_embeddings", "read_embeddings", "SUFFIXES"]
