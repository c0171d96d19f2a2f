"""The container image, checked without a Docker engine: the Dockerfile is read and parsed, and
the entrypoint script is executed with stand-in commands. No database is needed."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from api.__main__ import build_parser

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ENTRYPOINT_SCRIPT = REPO / "infra" / "docker-entrypoint.sh"
BASE_IMAGE = "python:3.11-slim-bookworm"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form's arguments, or None for the shell form."""
        if not self.args.startswith("["):
            return None
        value = json.loads(self.args)
        assert isinstance(value, list)
        assert all(isinstance(item, str) for item in value)
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (enough for ours)."""
    instructions: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        joined = " ".join(part for part in buffer if part)
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = []
    assert not buffer, "the Dockerfile ends inside a continued line"
    return instructions


def split_flags(args: str) -> tuple[dict[str, str], list[str]]:
    """``--flag=value`` options first, then the remaining words."""
    flags: dict[str, str] = {}
    words = shlex.split(args)
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        flags[name] = value
    return flags, words


def parse_env(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy `ENV KEY value`
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by stage; each group starts with its FROM."""
    groups: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            groups.append([])
        if groups:
            groups[-1].append(instruction)
    return groups


@pytest.fixture(scope="module")
def runtime(stages: list[list[Instruction]]) -> list[Instruction]:
    return stages[-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ARG" and "=" in instruction.args:
            name, _, value = instruction.args.partition("=")
            defaults[name.strip()] = value.strip()
    return defaults


def substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], value)


# --- the Dockerfile ---------------------------------------------------------------------------


def test_multi_stage_on_pinned_slim_python(
    instructions: list[Instruction], stages: list[list[Instruction]]
) -> None:
    assert len(stages) >= 2
    variables = build_args(instructions)
    names = []
    for stage in stages:
        _, words = split_flags(stage[0].args)
        assert substitute(words[0], variables) == BASE_IMAGE
        if len(words) == 3:
            assert words[1].upper() == "AS"
            names.append(words[2])
    copied_from = [
        split_flags(i.args)[0]["from"]
        for i in stages[-1]
        if i.keyword == "COPY" and "from" in split_flags(i.args)[0]
    ]
    assert copied_from, "the final stage copies nothing from an earlier stage"
    assert set(copied_from) <= set(names)


def test_builder_installs_the_lock_with_hashes(stages: list[list[Instruction]]) -> None:
    builder_runs = [i.args for stage in stages[:-1] for i in stage if i.keyword == "RUN"]
    assert any("python -m venv /opt/venv" in run for run in builder_runs)
    installs = [run for run in builder_runs if "pip install" in run]
    assert len(installs) == 1, installs
    words = shlex.split(installs[0])
    assert words[0] == "/opt/venv/bin/pip"
    assert "--require-hashes" in words
    assert "--no-deps" in words
    assert words[words.index("-r") + 1].endswith("requirements.lock")


def test_runtime_copies_venv_and_code(runtime: list[Instruction]) -> None:
    copies = [split_flags(i.args) for i in runtime if i.keyword == "COPY"]
    assert ({"from": "builder"}, ["/opt/venv", "/opt/venv"]) in copies
    assert any(words[0].rstrip("/") == "api" for flags, words in copies if "from" not in flags)
    assert sorted((REPO / "api" / "db" / "migrations").rglob("*.sql")), "no migrations to copy"


def test_every_copied_path_exists_and_is_not_dockerignored(
    instructions: list[Instruction],
) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    sources = []
    for instruction in instructions:
        if instruction.keyword not in {"COPY", "ADD"}:
            continue
        flags, words = split_flags(instruction.args)
        if "from" in flags:
            continue
        sources.extend(words[:-1])
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY source {source!r} is not in the repository"
        assert not dockerignored(source.rstrip("/"), patterns), f"{source!r} is .dockerignore'd"
        if path.is_dir():
            for child in path.rglob("*"):
                relative = child.relative_to(REPO).as_posix()
                if "__pycache__" not in relative:
                    assert not dockerignored(relative, patterns), f"{relative!r} is ignored"


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rules, roughly: last match wins, `!` re-includes, a directory takes its contents."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    for path in (".venv", ".data/pg", ".git/HEAD", "tests/test_http.py", "bench/results/x.json"):
        assert dockerignored(path, patterns), path
    for path in ("api/__pycache__/app.cpython-311.pyc", ".mypy_cache", ".pytest_cache"):
        assert dockerignored(path, patterns), path
    for path in ("api/app.py", "requirements.lock", "infra/docker-entrypoint.sh"):
        assert not dockerignored(path, patterns), path


def test_runs_as_a_non_root_user(runtime: list[Instruction]) -> None:
    users = [i for i in runtime if i.keyword == "USER"]
    assert users, "the final stage has no USER"
    user = users[-1].args.split(":")[0]
    assert user not in {"root", "0", ""}
    assert user == "10001"
    assert any("--uid 10001" in i.args for i in runtime if i.keyword == "RUN")
    # Nothing after USER should need root.
    last_user = runtime.index(users[-1])
    assert not [i for i in runtime[last_user:] if i.keyword in {"RUN", "COPY", "ADD"}]


def test_production_environment(runtime: list[Instruction]) -> None:
    env: dict[str, str] = {}
    for instruction in runtime:
        if instruction.keyword == "ENV":
            env.update(parse_env(instruction.args))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["SJAAK_ENVIRONMENT"] == "production"
    assert env["SJAAK_HOST"] == "0.0.0.0"
    assert env["SJAAK_SEED_DEMO"] == "false"
    assert "SJAAK_DATABASE_URL" not in env
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert only(runtime, "EXPOSE").args.split() == ["8000"]


def test_healthcheck_requests_ready_with_urllib(runtime: list[Instruction]) -> None:
    check = only(runtime, "HEALTHCHECK")
    flags, _ = split_flags(check.args)
    assert {"interval", "timeout", "retries"} <= set(flags)
    command = Instruction("CMD", check.args[check.args.index("CMD") + 3 :].strip(), check.line)
    argv = command.exec_form()
    assert argv is not None, "use the exec form so no shell is needed"
    assert argv[:2] == ["python", "-c"]
    code = argv[2]
    assert "urllib.request" in code
    assert "http://127.0.0.1:8000/ready" in code
    compile(code, "<healthcheck>", "exec")  # it is at least valid Python


def test_entrypoint_and_default_command(runtime: list[Instruction]) -> None:
    entrypoint = only(runtime, "ENTRYPOINT").exec_form()
    assert entrypoint is not None
    installed = [
        split_flags(i.args)[1]
        for i in runtime
        if i.keyword == "COPY" and "infra/docker-entrypoint.sh" in i.args
    ]
    assert installed == [["infra/docker-entrypoint.sh", entrypoint[0]]]
    cmd = only(runtime, "CMD").exec_form()
    assert cmd == ["python", "-m", "api", "serve", "--workers", "2"]
    args = build_parser().parse_args(cmd[3:])
    assert args.command == "serve"
    assert args.workers == 2


@pytest.mark.parametrize("argv", [["worker"], ["migrate"], ["migrate", "--status"]])
def test_alternative_commands_are_valid_cli(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).command == argv[0]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
def test_hadolint() -> None:
    result = subprocess.run(
        ["hadolint", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the entrypoint script --------------------------------------------------------------------

SHELLS = [shell for shell in ("bash", "sh") if shutil.which(shell)]


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A `python` that only reports how it was called."""
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\necho "fake-python $*"\n')
    python.chmod(0o755)
    return tmp_path


def run_entrypoint(
    shell: str, fake_bin: Path, args: list[str], database_url: str | None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SJAAK_DATABASE_URL"}
    env["PATH"] = f"{fake_bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    if database_url is not None:
        env["SJAAK_DATABASE_URL"] = database_url
    return subprocess.run(
        [shutil.which(shell) or shell, str(ENTRYPOINT_SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_entrypoint_script_is_executable() -> None:
    assert os.access(ENTRYPOINT_SCRIPT, os.X_OK)
    assert ENTRYPOINT_SCRIPT.read_text().startswith("#!/bin/sh\n")


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("database_url", [None, ""])
@pytest.mark.parametrize(
    "args",
    [
        ["python", "-m", "api", "serve", "--workers", "2"],
        ["worker"],
        ["migrate"],
        ["echo", "should not run"],
    ],
)
def test_entrypoint_refuses_to_start_without_database_url(
    shell: str, fake_bin: Path, args: list[str], database_url: str | None
) -> None:
    result = run_entrypoint(shell, fake_bin, args, database_url)
    assert result.returncode != 0
    assert "SJAAK_DATABASE_URL is not set" in result.stderr
    assert "refusing to start" in result.stderr
    assert result.stdout == ""  # nothing was executed


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["python", "-m", "api", "serve", "--workers", "2"],
            "fake-python -m api serve --workers 2",
        ),
        (["worker"], "fake-python -m api worker"),
        (["migrate", "--status"], "fake-python -m api migrate --status"),
        (["tenants", "list"], "fake-python -m api tenants list"),
        (["echo", "hello"], "hello"),
    ],
)
def test_entrypoint_execs_the_command_with_database_url(
    shell: str, fake_bin: Path, args: list[str], expected: str
) -> None:
    result = run_entrypoint(shell, fake_bin, args, "postgresql://u:p@db:5432/sjaak")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
    assert result.stderr == ""


@pytest.mark.parametrize("shell", SHELLS)
def test_entrypoint_exit_status_is_the_commands(shell: str, fake_bin: Path) -> None:
    assert run_entrypoint(shell, fake_bin, ["true"], "postgresql://db/sjaak").returncode == 0
    assert run_entrypoint(shell, fake_bin, ["false"], "postgresql://db/sjaak").returncode == 1


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("args", [["openapi"], ["--help"], ["python", "-m", "api", "openapi"]])
def test_entrypoint_lets_database_free_commands_through(
    shell: str, fake_bin: Path, args: list[str]
) -> None:
    result = run_entrypoint(shell, fake_bin, args, None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("fake-python -m api ")
