"""``python -m api worker`` and ``serve --with-worker`` (``make run``), run as a user would."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import asyncpg
import httpx

from api.jobs import periodic_jobs
from tests.conftest import REPO, TEST_SECRET, DatabaseFactory
from tests.test_cli import cli_env, free_port


def json_lines(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


class Output:
    """A process's output, read as it comes on a thread of its own."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    def wait_for(self, text: str, process: subprocess.Popen[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in:\n{self.text()}")
            time.sleep(0.05)

    def text(self) -> str:
        return "".join(self.lines)

    def finish(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.lines)


async def test_the_worker_command_schedules_the_chores_and_stops_on_sigterm(
    new_database: DatabaseFactory,
) -> None:
    url = await new_database()
    env = cli_env(SJAAK_DATABASE_URL=url, SJAAK_SECRET_KEY=TEST_SECRET)
    worker = subprocess.Popen(
        [sys.executable, "-m", "api", "worker"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(worker)
    try:
        conn = await asyncpg.connect(url)
        try:
            deadline = time.monotonic() + 60
            ran, chores = 0, len(periodic_jobs())
            while ran < chores and worker.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                if await conn.fetchval("SELECT to_regclass('sjaak.pgqueuer_schedules') IS NULL"):
                    continue
                ran = await conn.fetchval(
                    "SELECT count(*) FROM sjaak.pgqueuer_schedules WHERE last_run IS NOT NULL"
                )
        finally:
            await conn.close()
        assert ran == chores, "each chore ran once at the first start"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    lines = json_lines(output.finish())
    messages = [line["message"] for line in lines if line.get("logger") == "sjaak.worker"]
    assert messages[0] == "worker started" and messages[-1] == "worker stopped"
    assert [line for line in lines if line["level"] in ("warning", "error")] == []
    done = {line["job"] for line in lines if line.get("message") == "job done"}
    assert done == {c.name for c in periodic_jobs()}
    assert done >= {
        "prune-expired-credentials",
        "rotate-signing-keys",
        "journey-drift",
        "rfm-recompute",
    }


def test_serve_with_worker_starts_postgres_once_and_ctrl_c_stops_everything(
    tmp_path: Path,
) -> None:
    env = cli_env(SJAAK_DATA_DIR=str(tmp_path / "data"))
    port = free_port()
    # Its own process group, like a terminal's foreground job: Ctrl-C reaches every process in it.
    process = subprocess.Popen(
        [sys.executable, "-m", "api", "serve", "--with-worker", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = Output(process)
    pgdata = tmp_path / "data" / "pg"
    try:
        output.wait_for('"worker started"', process)
        output.wait_for("serving on", process)
        deadline = time.monotonic() + 60
        while not ready(f"http://127.0.0.1:{port}"):
            assert time.monotonic() < deadline and process.poll() is None, output.text()
            time.sleep(0.1)
        assert (pgdata / "postmaster.pid").exists()
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = output.finish()
    assert "background worker running" in text
    lines = json_lines(text)
    starts = [line for line in lines if line.get("message") == "starting embedded PostgreSQL"]
    assert len(starts) == 1, "the worker used the server serve started"
    worker = [line["message"] for line in lines if line.get("logger") == "sjaak.worker"]
    assert "worker started" in worker and worker[-1] == "worker stopped"
    assert not (pgdata / "postmaster.pid").exists(), "PostgreSQL was stopped after both"
