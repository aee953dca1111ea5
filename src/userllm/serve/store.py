"""The event store behind ``userllm serve``: users' events, committed before they are acknowledged.

One schema for SQLite (the embedded default: a file in WAL mode, ``synchronous=FULL``) and PostgreSQL
(``postgresql+psycopg://...``: several server processes or machines share it), through SQLAlchemy 2 with
parameterised statements only. ``userllm_meta`` holds the schema version (created on first use; a newer
version than this userllm knows is refused).

===============  ===========  ==========================================================================
column           type         meaning
===============  ===========  ==========================================================================
``id``           int64        store order, strictly increasing: a user's newest ``id`` fingerprints the
                              events a cached context was computed from
``user_id``      str          the dataset's user id
``event_id``     str | null   the client's id of the event: a retry with the same id adds nothing
``item_id``      str          the dataset's item id
``rating``       float | null
``timestamp``    int64        seconds since the Unix epoch; a user's timeline is ordered by (timestamp, id)
``text``         str | null   review text
===============  ===========  ==========================================================================

Example::

    store = EventStore("sqlite:///runs/x/events.db")
    store.append("u1", [{"item_id": "50", "rating": 5, "timestamp": 881250949, "event_id": "e1"}])   # -> 1
    store.timeline("u1", last=50)      # the user's newest 50 events, oldest first
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from userllm.errors import InputError

SCHEMA_VERSION = 1
ID_LENGTH = 128  # longest user, item and event id

metadata = MetaData()
meta = Table("userllm_meta", metadata, Column("key", String(64), primary_key=True), Column("value", String(256)))
events = Table(
    "userllm_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("user_id", String(ID_LENGTH), nullable=False),
    Column("event_id", String(ID_LENGTH)),
    Column("item_id", String(ID_LENGTH), nullable=False),
    Column("rating", Float),
    Column("timestamp", BigInteger, nullable=False),
    Column("text", Text),
    UniqueConstraint("user_id", "event_id", name="uq_userllm_events_user_event"),
    Index("ix_userllm_events_user_time", "user_id", "timestamp", "id"),
)
FIELDS = ("id", "event_id", "item_id", "rating", "timestamp", "text")


@dataclass(frozen=True)
class Fingerprint:
    """What a user's committed events are: their count and the newest store id (0, 0 for none)."""

    count: int
    last_id: int


def sqlite_url_beside(run_dir: Path) -> str:
    """The embedded default: ``events.db`` in the served run's directory."""
    return f"sqlite:///{Path(run_dir).resolve() / 'events.db'}"


class EventStore:
    """Users' events in SQLite or PostgreSQL (see module docstring). Thread-safe: each call uses its own
    connection from the engine's pool."""

    def __init__(self, url: str) -> None:
        expected = "sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        try:
            backend = make_url(url).get_backend_name()
        except ArgumentError as e:
            raise InputError(f"--db {url!r}: not a database URL ({expected}): {e}") from None
        if backend not in ("sqlite", "postgresql"):
            raise InputError(
                f"--db {url!r}: userllm's event store runs on sqlite or postgresql, not {backend} ({expected})"
            )
        try:
            # a pooled PostgreSQL connection may have been closed by the server: ping it at checkout; a SQLite
            # file's cannot, and the ping would cost every append and chat request a statement
            self.engine: Engine = create_engine(url, pool_pre_ping=backend != "sqlite")
        except (ArgumentError, ImportError) as e:
            raise InputError(f"--db {url!r}: SQLAlchemy cannot open it ({expected}): {e}") from None
        self.url = url
        self.dialect = backend
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._create()

    def _create(self) -> None:
        """Create the schema if missing (versioned); refuse a database written by a newer userllm."""
        try:
            with self.engine.begin() as conn:
                metadata.create_all(conn)
                version = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
                if version is None:
                    conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                elif int(version) > SCHEMA_VERSION:
                    raise InputError(
                        f"{self.url}: event store schema version {version} is newer than this userllm's "
                        f"({SCHEMA_VERSION}); upgrade userllm"
                    )
        except OperationalError as e:
            raise InputError(f"cannot open the event store {self.url}: {e.orig}") from None

    def _add(self, conn, values: list[dict]) -> None:
        """Insert event rows (with ``user_id``) on ``conn``; a row whose user already has its ``event_id`` is
        skipped (an INSERT ... ON CONFLICT DO NOTHING of this dialect)."""
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        if values:
            conn.execute(insert(events).on_conflict_do_nothing(index_elements=["user_id", "event_id"]), values)

    def add_rows(self, values: list[dict]) -> None:
        """Insert event rows (``user_id``, ``event_id``, ``item_id``, ``rating``, ``timestamp``, ``text``) in one
        transaction, committed on return, skipping those already there (bulk loads: :func:`import_dataset`)."""
        with self.engine.begin() as conn:
            self._add(conn, values)

    def append(self, user_id: str, rows: list[dict]) -> int:
        """Add ``rows`` (``item_id``, ``rating``, ``timestamp``, optional ``text`` and ``event_id``) to the user's
        events in one transaction, committed on return; a row whose ``event_id`` the user already has is
        skipped (retries are idempotent). Returns the user's event count."""
        return self.append_many([(user_id, rows)])[0]

    def append_many(self, appends: list[tuple[str, list[dict]]]) -> list[int]:
        """Several appends (``(user_id, rows)``, as :meth:`append`) in one transaction: one commit (one fsync)
        for all of them, which is how a server acknowledges many concurrent appends per second (group
        commit). Returns each append's user event count after the commit, in order."""
        values = [
            {
                "user_id": user,
                "event_id": r.get("event_id"),
                "item_id": r["item_id"],
                "rating": r.get("rating"),
                "timestamp": int(r["timestamp"]),
                "text": r.get("text"),
            }
            for user, rows in appends
            for r in rows
        ]
        users = sorted({user for user, _ in appends})
        with self.engine.begin() as conn:
            self._add(conn, values)
            query = select(events.c.user_id, func.count()).where(events.c.user_id.in_(users)).group_by(events.c.user_id)
            counts = dict(conn.execute(query).all())
        return [counts.get(user, 0) for user, _ in appends]

    def fingerprint(self, user_id: str) -> Fingerprint:
        with self.engine.connect() as conn:
            count, last = conn.execute(
                select(func.count(), func.max(events.c.id)).where(events.c.user_id == user_id)
            ).one()
        return Fingerprint(int(count), int(last or 0))

    def timeline(self, user_id: str, last: int | None = None) -> tuple[Fingerprint, list[dict]]:
        """The user's fingerprint and their ``last`` newest events (all when None), oldest first, read in one
        transaction (so the two agree)."""
        order = (events.c.timestamp.desc(), events.c.id.desc())
        query = select(*(events.c[f] for f in FIELDS)).where(events.c.user_id == user_id).order_by(*order)
        with self.engine.connect() as conn, conn.begin():
            count, newest = conn.execute(
                select(func.count(), func.max(events.c.id)).where(events.c.user_id == user_id)
            ).one()
            rows = [dict(r._mapping) for r in conn.execute(query.limit(last) if last else query)]
        return Fingerprint(int(count), int(newest or 0)), rows[::-1]

    def delete_user(self, user_id: str) -> int:
        """Remove every event of the user; returns how many there were."""
        with self.engine.begin() as conn:
            return conn.execute(delete(events).where(events.c.user_id == user_id)).rowcount

    def users(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count(func.distinct(events.c.user_id)))).scalar_one()

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    """WAL (readers never block the writer), full fsync at commit, and a wait instead of 'database is locked'."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def import_dataset(store: EventStore, ds, *, chunk: int = 20_000, progress=None) -> int:
    """Load a prepared dataset's timelines into the store (its ``events.parquet``, in timeline order), so a
    trained run can serve its own users at once. Idempotent: each event's ``event_id`` is
    ``prepared:<position in the user's timeline>``, and a second import adds nothing. ``progress(n)`` is
    called with the rows of each committed chunk. Returns the number of events in the store."""
    frame = ds.events.select("user_id", "item_id", "rating", "timestamp", "text", "pos")
    for start in range(0, frame.height, chunk):
        part = frame.slice(start, chunk)
        store.add_rows(
            [
                {"user_id": u, "event_id": f"prepared:{pos}", "item_id": i, "rating": r, "timestamp": t, "text": x}
                for u, i, r, t, x, pos in part.iter_rows()
            ]
        )
        if progress is not None:
            progress(part.height)
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(events)).scalar_one()
