"""The store-and-forward spool: an SQLite database in WAL mode, bounded in payload bytes.

Every message is written here first and deleted only after the broker acknowledged it (PUBACK), so a crash or a
power cut loses nothing that was committed (synchronous=FULL: each batch is one fsync'd transaction).
When full: the oldest maps (JPEGs) are dropped first; when no map is left, the oldest results are dropped. Every
drop is counted in the spool (`dropped_maps`, `dropped_results`) and reported; a new map that does not fit
without dropping a result is itself dropped (and counted).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

RESULT, MAP = "result", "map"
SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
    topic TEXT NOT NULL, payload BLOB NOT NULL, bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
FILE_NAME = "spool.sqlite3"


class SpoolError(OSError):
    pass


class Spool:
    """Used from one thread (the publisher's); a lock file keeps two runs off one spool."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.folder / "spool.lock", "a")
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpoolError(f"spool {self.folder} is in use by another run") from None
        except OSError as error:
            raise SpoolError(f"spool {self.folder}: {error.strerror or error}") from None
        try:
            self._db = sqlite3.connect(str(self.folder / FILE_NAME), isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            row = self._db.execute("SELECT COALESCE(SUM(bytes), 0), COUNT(*) FROM messages").fetchone()
        except sqlite3.DatabaseError as error:
            raise SpoolError(f"spool {self.folder / FILE_NAME}: not a usable spool ({error})") from None
        self.bytes, self.count = int(row[0]), int(row[1])

    def counters(self) -> Dict[str, int]:
        return {name: int(value) for name, value in self._db.execute("SELECT name, value FROM counters")}

    def _count(self, name: str, n: int = 1) -> None:
        self._db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
                         (name, n, n))

    def _drop_oldest(self, kind: str) -> bool:
        row = self._db.execute("SELECT seq, bytes FROM messages WHERE kind = ? ORDER BY seq LIMIT 1",
                               (kind,)).fetchone()
        if row is None:
            return False
        self._db.execute("DELETE FROM messages WHERE seq = ?", (row[0],))
        self.bytes -= int(row[1])
        self.count -= 1
        self._count("dropped_" + kind + "s")
        return True

    def add(self, messages: Iterable[Tuple[str, str, bytes]]) -> List[int]:
        """Store (kind, topic, payload) messages in one transaction; their sequence numbers (dropped: absent)."""
        seqs: List[int] = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for kind, topic, payload in messages:
                size = len(payload) + len(topic)
                while self.bytes + size > self.max_bytes and self._drop_oldest(MAP):
                    pass
                if self.bytes + size > self.max_bytes and (kind == MAP or size > self.max_bytes):
                    self._count("dropped_" + kind + "s")
                    continue
                while self.bytes + size > self.max_bytes and self._drop_oldest(RESULT):
                    pass
                cursor = self._db.execute("INSERT INTO messages (kind, topic, payload, bytes) VALUES (?,?,?,?)",
                                          (kind, topic, payload, size))
                seqs.append(int(cursor.lastrowid or 0))
                self.bytes += size
                self.count += 1
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return seqs

    def after(self, seq: int, limit: int) -> List[Tuple[int, str, bytes]]:
        """Up to `limit` messages with a sequence number above `seq`, oldest first."""
        rows = self._db.execute("SELECT seq, topic, payload FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                                (seq, limit)).fetchall()
        return [(int(s), str(t), bytes(p)) for s, t, p in rows]

    def remove(self, seqs: Iterable[int]) -> None:
        keys = [(int(s),) for s in seqs]
        if not keys:
            return
        self._db.execute("BEGIN IMMEDIATE")
        for (seq,) in keys:
            row = self._db.execute("DELETE FROM messages WHERE seq = ? RETURNING bytes", (seq,)).fetchone()
            if row is not None:
                self.bytes -= int(row[0])
                self.count -= 1
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()
        self._lock.close()


def default_spool_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "patchcore-edge" / "spool"


__all__ = ["Spool", "SpoolError", "RESULT", "MAP", "default_spool_dir", "FILE_NAME"]
