"""The worker's chores: pruning what no longer matters, rotating signing keys, stopping cleanly."""

from __future__ import annotations

import asyncio
import uuid

from api.auth import oauth_clients
from api.auth.secrets import Keyring
from api.db import Database
from api.worker import Chore, chores, prune_expired_credentials, run_worker
from tests.conftest import ProvisionFactory, settings_for_tests


async def test_pruning_deletes_only_what_can_no_longer_matter(
    db: Database, keyring: Keyring, provision: ProvisionFactory
) -> None:
    shop = await provision()
    old_notice, fresh_notice, live_token_notice = (uuid.uuid4().hex for _ in range(3))
    async with db.control() as conn:
        await conn.execute(
            "INSERT INTO sjaak.revocations (kind, subject, expires_at, created_at) VALUES"
            " ('api_key', $1, NULL, now() - interval '2 days'),"
            " ('api_key', $2, NULL, now()),"
            " ('access_token', $3, now() + interval '10 minutes', now() - interval '2 days')",
            old_notice,
            fresh_notice,
            live_token_notice,
        )
        client = await oauth_clients.create_client(
            conn,
            keyring,
            tenant_id=shop.tenant.id,
            name="pruning",
            scopes=frozenset({"customers:read"}),
            grant_types=frozenset({"client_credentials"}),
        )
        await conn.execute(
            "INSERT INTO sjaak.oauth_refresh_tokens (token_hash, family_id, client_id, tenant_id,"
            " scopes, expires_at) VALUES ($1, $2, $3, $4, '{}', now() - interval '2 days'),"
            " ($5, $2, $3, $4, '{}', now() + interval '2 days')",
            b"expired-token-hash-" + uuid.uuid4().bytes,
            uuid.uuid4(),
            client.client_id,
            shop.tenant.id,
            b"live-token-hash-" + uuid.uuid4().bytes,
        )

    assert await prune_expired_credentials(db) >= 2

    async with db.control() as conn:
        subjects = {r["subject"] for r in await conn.fetch("SELECT subject FROM sjaak.revocations")}
        refresh = await conn.fetch(
            "SELECT expires_at > now() AS live FROM sjaak.oauth_refresh_tokens"
            " WHERE client_id = $1",
            client.client_id,
        )
    assert old_notice not in subjects
    assert {fresh_notice, live_token_notice} <= subjects
    assert [r["live"] for r in refresh] == [True]


async def test_the_worker_runs_due_chores_and_stops_on_request() -> None:
    stop = asyncio.Event()
    runs: list[str] = []

    async def record() -> int:
        runs.append("ran")
        stop.set()
        return 1

    async def fail() -> int:
        raise RuntimeError("a broken chore must not stop the others")

    await asyncio.wait_for(
        run_worker([Chore("fails", 60, fail), Chore("records", 60, record)], stop), timeout=5
    )
    assert runs == ["ran"]


async def test_the_signing_key_chore_makes_a_key(fresh_db: Database, keyring: Keyring) -> None:
    from api.db.migrate import migrate

    await migrate(fresh_db)
    [rotate] = [
        c
        for c in chores(settings_for_tests(), fresh_db, keyring)
        if c.name == "rotate-signing-keys"
    ]
    await rotate.run()
    async with fresh_db.control() as conn:
        signing = await conn.fetchval(
            "SELECT count(*) FROM sjaak.signing_keys WHERE retired_at IS NULL"
        )
    assert signing == 1
