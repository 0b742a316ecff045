"""Principals and their bearer tokens. Tokens are shown once and stored only as SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import sqlalchemy as sa

from memvault import inputs
from memvault.clock import Clock
from memvault.errors import Conflict, NotFound, Unauthenticated
from memvault.ids import new_id
from memvault.metadata import Database
from memvault.metadata.schema import principals, tokens

TOKEN_PREFIX = "mvt_"

_BY_TOKEN = (
    sa.select(principals.c.id, principals.c.name, principals.c.is_admin)
    .join(tokens, tokens.c.principal_id == principals.c.id)
    .where(tokens.c.token_hash == sa.bindparam("token_hash"))
)
"""Built once: every request runs it (docs/decisions.md, "Statements built once")."""


@dataclass(frozen=True)
class Principal:
    id: str
    name: str
    is_admin: bool


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AuthService:
    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    async def create_principal(self, name: str, *, is_admin: bool = False) -> tuple[Principal, str]:
        """Make a principal and its first token; the token is returned once, never stored."""
        name = inputs.text(name.strip(), "principal name", max_length=200)
        principal = Principal(new_id("prn"), name, is_admin)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock.now()

        def create(conn: sa.Connection) -> None:
            taken = conn.execute(sa.select(principals.c.id).where(principals.c.name == name))
            if taken.first() is not None:
                raise Conflict(f"a principal named {name!r} already exists")
            conn.execute(
                sa.insert(principals).values(
                    id=principal.id, name=name, is_admin=is_admin, created_at=now
                )
            )
            conn.execute(
                sa.insert(tokens).values(
                    token_hash=hash_token(token), principal_id=principal.id, created_at=now
                )
            )

        await self.db.transact(create)
        return principal, token

    async def rotate_token(self, name: str) -> str:
        """Revoke every token of the principal ``name`` and return a new one (shown once).
        The old tokens stop working at the next request: nothing caches them."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock.now()

        def rotate(conn: sa.Connection) -> None:
            found = conn.execute(
                sa.select(principals.c.id).where(principals.c.name == name.strip())).first()
            if found is None:
                raise NotFound(f"no principal named {name.strip()!r}")
            conn.execute(sa.delete(tokens).where(tokens.c.principal_id == found.id))
            conn.execute(sa.insert(tokens).values(
                token_hash=hash_token(token), principal_id=found.id, created_at=now))

        await self.db.transact(rotate)
        return token

    async def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthenticated("send 'Authorization: Bearer <token>'")
        where = {"token_hash": hash_token(token)}
        row = await self.db.query(lambda conn: conn.execute(_BY_TOKEN, where).first())
        if row is None:
            raise Unauthenticated("the bearer token is not valid")
        return Principal(row.id, row.name, bool(row.is_admin))

    async def has_principals(self) -> bool:
        query = sa.select(principals.c.id).limit(1)
        return await self.db.query(lambda conn: conn.execute(query).first()) is not None
