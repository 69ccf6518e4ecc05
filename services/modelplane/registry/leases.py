"""Named leases: one holder at a time, with an expiry, on SQLite and PostgreSQL alike.

The placer's leadership is the lease named "placer": each registry replica's placer loop calls
`acquire` every few seconds; the one that gets it places, the others wait. A holder renews by
acquiring again before expiry; a holder that cannot renew (its replica hung, or lost the
database) loses the lease when it expires, and another takes it over. `term` grows each time the
lease changes hands; writes made on the strength of a lease check it in their own transaction
(`held`), so a former holder's late write is refused rather than applied.

Acquiring is one INSERT ... ON CONFLICT DO UPDATE ... WHERE statement: the row is taken only when
it is free, lapsed, or already this holder's, atomically on both databases, with times from the
database's clock (RegistryStore.now).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from modelplane.registry import schema
from modelplane.registry.rows import utc

if TYPE_CHECKING:
    from modelplane.registry.store import RegistryStore


@dataclass(frozen=True)
class Lease:
    name: str
    holder: str
    # Grows by one each time the lease changes hands.
    term: int
    acquire_time: datetime
    renew_time: datetime
    expire_time: datetime

    def valid(self, now: datetime) -> bool:
        return now < self.expire_time


def _lease_from_row(row: sa.Row) -> Lease:
    return Lease(
        name=row.name,
        holder=row.holder,
        term=row.term,
        acquire_time=utc(row.acquire_time),  # type: ignore[arg-type]
        renew_time=utc(row.renew_time),  # type: ignore[arg-type]
        expire_time=utc(row.expire_time),  # type: ignore[arg-type]
    )


class LeaseStore:
    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    async def acquire(self, name: str, holder: str, duration: timedelta) -> Lease | None:
        """Takes the lease for `duration` when nobody holds it, its holder let it lapse, or
        `holder` holds it already (a renewal); returns it, or None while another holds it."""
        if not holder:
            raise ValueError("a lease holder must say who it is")
        if duration <= timedelta(0):
            raise ValueError("a lease lasts a positive time")
        table = schema.leases
        async with self._store.write() as write:
            now = await self._store.now(write.connection)
            insert = (postgresql.insert if self._store.postgres else sqlite.insert)(table).values(
                name=name, holder=holder, term=1, acquire_time=now, renew_time=now, expire_time=now + duration
            )
            same_holder = table.c.holder == insert.excluded.holder
            statement = insert.on_conflict_do_update(
                index_elements=[table.c.name],
                set_={
                    "holder": insert.excluded.holder,
                    "term": sa.case((same_holder, table.c.term), else_=table.c.term + 1),
                    "acquire_time": sa.case((same_holder, table.c.acquire_time), else_=insert.excluded.acquire_time),
                    "renew_time": insert.excluded.renew_time,
                    "expire_time": insert.excluded.expire_time,
                },
                where=same_holder | (table.c.expire_time <= insert.excluded.renew_time),
            ).returning(*table.c)
            row = (await write.connection.execute(statement)).first()
        return _lease_from_row(row) if row is not None else None

    async def release(self, name: str, holder: str) -> bool:
        """Ends `holder`'s lease now, so another can take it without waiting for it to expire
        (a replica stopping cleanly). False when `holder` did not hold it."""
        table = schema.leases
        async with self._store.write() as write:
            now = await self._store.now(write.connection)
            result = await write.connection.execute(
                sa.update(table)
                .where(table.c.name == name, table.c.holder == holder, table.c.expire_time > now)
                .values(expire_time=now)
            )
        return result.rowcount > 0

    async def get(self, name: str) -> Lease | None:
        """The lease as recorded (it may have lapsed: compare expire_time with `now`)."""
        async with self._store.engine.connect() as connection:
            row = (await connection.execute(sa.select(schema.leases).where(schema.leases.c.name == name))).first()
        return _lease_from_row(row) if row is not None else None

    async def held(self, connection: AsyncConnection, name: str, holder: str, now: datetime) -> Lease | None:
        """Within a write transaction: the lease when `holder` holds it and it has not lapsed,
        locked against a takeover until the transaction ends; None otherwise."""
        table = schema.leases
        row = (
            await connection.execute(
                sa.select(table).where(table.c.name == name).with_for_update(read=True)  # FOR SHARE
            )
        ).first()
        if row is None:
            return None
        lease = _lease_from_row(row)
        return lease if lease.holder == holder and lease.valid(now) else None
