"""The deploy files are valid and say what operations rely on: the ECS task definition
parses with the fields ECS requires, the systemd units pass `systemd-analyze verify`
(where the tool exists) and carry the key directives, the Dockerfile is multi-stage,
non-root, with an init and the project's own health check."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stream_supervisor.cli import build_parser
from stream_supervisor.settings import DEFAULT_DRAIN_TIMEOUT
from stream_supervisor.supervisor import EXIT_CONFIG

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNIT = DEPLOY / "systemd" / "stream-supervisor.service"
PRUNE_UNIT = DEPLOY / "systemd" / "stream-supervisor-prune.service"
PRUNE_TIMER = DEPLOY / "systemd" / "stream-supervisor-prune.timer"
STATS_UNIT = DEPLOY / "systemd" / "stream-supervisor-stats.service"
STATS_TIMER = DEPLOY / "systemd" / "stream-supervisor-stats.timer"
TASK = DEPLOY / "ecs" / "task-definition.json"
STATS_SCHEDULE = DEPLOY / "ecs" / "stats-schedule.json"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
SECRET_VARS = {"APCA_API_KEY_ID", "APCA_API_SECRET_KEY", "DATABASE_URL"}
# Fargate task sizes: cpu units -> allowed memory (MiB) for the small sizes.
FARGATE_MEMORY = {
    "256": {512, 1024, 2048},
    "512": set(range(1024, 4097, 1024)),
    "1024": set(range(2048, 8193, 1024)),
    "2048": set(range(4096, 16385, 1024)),
}


def _cli_parses(argv: list[str]) -> None:
    build_parser().parse_args(argv)  # SystemExit(2) on a bad command line


# --------------------------------------------------------------------- ECS


def _task() -> dict[str, Any]:
    task = json.loads(TASK.read_text())
    assert isinstance(task, dict)
    return task


def test_task_definition_has_what_ecs_requires() -> None:
    task = _task()
    assert task["family"] == "stream-supervisor"
    assert task["requiresCompatibilities"] == ["FARGATE"]
    assert task["networkMode"] == "awsvpc"  # the only mode Fargate supports
    assert int(task["memory"]) in FARGATE_MEMORY[task["cpu"]]
    # Pulling secrets and writing awslogs is the execution role's job.
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/.+", task["executionRoleArn"])
    (container,) = task["containerDefinitions"]
    assert container["name"] and container["image"] and container["essential"] is True
    _cli_parses(container["command"])


def test_credentials_come_from_secrets_never_plain_environment() -> None:
    (container,) = _task()["containerDefinitions"]
    secrets = {s["name"]: s["valueFrom"] for s in container["secrets"]}
    assert set(secrets) == SECRET_VARS
    for value in secrets.values():
        assert re.match(r"arn:aws:(secretsmanager|ssm):[a-z0-9-]+:\d{12}:(secret|parameter)[:/]",
                        value), value
    plain = {e["name"] for e in container["environment"]}
    assert not plain & SECRET_VARS


def test_logs_health_check_and_stop_timeout() -> None:
    (container,) = _task()["containerDefinitions"]
    logs = container["logConfiguration"]
    assert logs["logDriver"] == "awslogs"
    assert {"awslogs-group", "awslogs-region", "awslogs-stream-prefix"} <= set(logs["options"])
    env = {e["name"]: e["value"] for e in container["environment"]}
    assert env["STREAM_SUPERVISOR_LOG_FORMAT"] == "json"
    assert env["STREAM_SUPERVISOR_HTTP_ADDR"].startswith("127.0.0.1:")

    check = container["healthCheck"]
    assert check["command"][0] == "CMD"
    assert check["command"][1:3] == ["stream-supervisor", "health"]
    _cli_parses(check["command"][2:])
    # The ranges ECS accepts (RegisterTaskDefinition refuses a task definition outside
    # them): interval 5-300 s, timeout 2-60 s, retries 1-10, startPeriod 0-300 s.
    assert 5 <= check["interval"] <= 300
    assert 2 <= check["timeout"] <= 60
    assert 1 <= check["retries"] <= 10
    assert 0 <= check["startPeriod"] <= 300
    # A probe must finish before the next one starts.
    assert check["timeout"] < check["interval"]

    drain = float(env.get("STREAM_SUPERVISOR_DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT))
    assert drain < container["stopTimeout"] <= 120  # Fargate's maximum


# --------------------------------------------------------------------- systemd


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: directive outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a directive: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def _values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def _one(section: list[tuple[str, str]], key: str) -> str:
    values = _values(section, key)
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def _seconds(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(min|ms|s|h)?", value):
        total += float(number) * {"": 1, "s": 1, "min": 60, "h": 3600, "ms": 0.001}[unit]
    return total


def test_service_unit_directives() -> None:
    service = _unit(UNIT)["Service"]
    assert _one(service, "Type") == "notify"
    assert _one(service, "Restart") == "on-failure"
    assert str(EXIT_CONFIG) in _one(service, "RestartPreventExitStatus").split()
    assert _seconds(_one(service, "WatchdogSec")) >= 10
    exec_start = shlex.split(_one(service, "ExecStart"))
    assert exec_start[0].endswith("/stream-supervisor")
    _cli_parses(exec_start[1:])
    assert _values(service, "EnvironmentFile") or _values(service, "LoadCredential")
    assert _one(service, "DynamicUser") == "yes" or _values(service, "User")
    assert _one(service, "ProtectSystem") == "strict"
    for flag in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert _one(service, flag) == "yes", flag
    families = _one(service, "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert "@system-service" in _values(service, "SystemCallFilter")
    env = dict(v.split("=", 1) for v in _values(service, "Environment"))
    drain = float(env.get("STREAM_SUPERVISOR_DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT))
    assert _seconds(_one(service, "TimeoutStopSec")) > drain
    assert _one(service, "KillSignal") == "SIGTERM"
    assert env["STREAM_SUPERVISOR_HTTP_ADDR"].startswith("127.0.0.1:")
    assert not set(env) & SECRET_VARS  # credentials only through the EnvironmentFile


def test_prune_units() -> None:
    service = _unit(PRUNE_UNIT)["Service"]
    assert _one(service, "Type") == "oneshot"
    exec_start = shlex.split(_one(service, "ExecStart"))
    _cli_parses(exec_start[1:])
    assert exec_start[1] == "prune"
    timer = _unit(PRUNE_TIMER)["Timer"]
    assert _values(timer, "OnCalendar") and _one(timer, "Persistent") == "true"


def test_stats_units() -> None:
    service = _unit(STATS_UNIT)["Service"]
    assert _one(service, "Type") == "oneshot"
    exec_start = shlex.split(_one(service, "ExecStart"))
    _cli_parses(exec_start[1:])
    assert exec_start[1] == "stats"
    # the same sandbox as the service's long-running unit
    assert _one(service, "ProtectSystem") == "strict" and _one(service, "DynamicUser") == "yes"
    timer = _unit(STATS_TIMER)["Timer"]
    assert _one(timer, "OnCalendar") == "*-*-* 02:00:00 UTC"
    assert _one(timer, "Persistent") == "true"


def test_stats_schedule_runs_the_task_definition_nightly() -> None:
    schedule = json.loads(STATS_SCHEDULE.read_text())
    assert schedule["ScheduleExpression"] == "cron(0 2 * * ? *)"
    assert schedule["ScheduleExpressionTimezone"] == "UTC"
    assert schedule["FlexibleTimeWindow"] == {"Mode": "OFF"}
    target = schedule["Target"]
    assert re.fullmatch(r"arn:aws:ecs:[a-z0-9-]+:\d{12}:cluster/.+", target["Arn"])
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/.+", target["RoleArn"])
    ecs = target["EcsParameters"]
    task = _task()
    assert ecs["TaskDefinitionArn"].endswith(f":task-definition/{task['family']}")
    assert ecs["LaunchType"] == "FARGATE" and ecs["TaskCount"] == 1
    assert ecs["NetworkConfiguration"]["awsvpcConfiguration"]["Subnets"]
    (override,) = json.loads(target["Input"])["containerOverrides"]
    assert override["name"] == task["containerDefinitions"][0]["name"]
    assert override["command"][0] == "stats"
    _cli_parses(override["command"])


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # Runs wherever systemd's tools are installed (they are on the CI machine); a
    # developer machine without them skips, saying so, rather than passing silently.
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's binary exists: point it at one that does.
    units = []
    for path in (UNIT, PRUNE_UNIT, PRUNE_TIMER, STATS_UNIT, STATS_TIMER):
        copy = tmp_path / path.name
        copy.write_text(path.read_text().replace("/opt/stream-supervisor/bin/stream-supervisor",
                                                 sys.executable))
        units.append(str(copy))
    result = subprocess.run([tool, "verify", "--man=no", *units], capture_output=True,
                            text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    if result.returncode != 0 and "stream-supervisor" not in output:
        # The tool itself failed (no systemd in a container, say) without a word about
        # our units: nothing was checked, so this is a skip with the tool's reason.
        pytest.skip(f"systemd-analyze cannot run here: {output.strip()[:300]}")
    # verify exits 0 even for unknown keys or bad values: any line naming our units fails.
    ours = [line for line in output.splitlines() if "stream-supervisor" in line]
    assert result.returncode == 0 and ours == [], output


# --------------------------------------------------------------------- Docker


def _stages() -> list[list[tuple[str, str]]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def test_dockerfile_is_multi_stage_slim_non_root_with_init_and_health_check() -> None:
    stages = _stages()
    assert len(stages) >= 2
    final = stages[-1]
    instructions = dict(final)  # the last one of each wins, as in Docker
    assert "COPY --from=builder" in " ".join(f"{i} {r}" for i, r in final)
    user = instructions["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert instructions["STOPSIGNAL"] == "SIGTERM"
    entrypoint = json.loads(instructions["ENTRYPOINT"])
    assert entrypoint[0].endswith("tini") and entrypoint[-1] == "stream-supervisor"
    _cli_parses(json.loads(instructions["CMD"]))
    health = instructions["HEALTHCHECK"]
    command = json.loads(health.split("CMD", 1)[1].strip())
    assert command[:2] == ["stream-supervisor", "health"]
    _cli_parses(command[1:])
    # Migrations ship in the image and the service is told where.
    copied = [r for i, r in final if i == "COPY" and r.startswith("migrations ")]
    assert copied
    target = copied[0].split()[-1]
    assert f"STREAM_SUPERVISOR_MIGRATIONS_DIR={target}" in instructions["ENV"]
    # No build tools in the final image: only tini is installed there.
    runs = " ".join(r for i, r in final if i == "RUN")
    for tool in ("build-essential", "gcc", "python3-dev", "libpq-dev", "pip install"):
        assert tool not in runs, tool


# --------------------------------------------------------------------- log schema


def _logged_events() -> dict[str, str]:
    """Every event name the package logs (first argument of log.<level>(...)), by file."""
    import ast

    package = Path(__file__).resolve().parents[1] / "stream_supervisor"
    found: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("debug", "info", "warning", "error", "exception",
                                           "critical")
                    and "log" in ast.unparse(node.func.value)
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                found[node.args[0].value] = f"{path.name}:{node.lineno}"
    return found


def test_logging_doc_lists_every_event() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "logging.md").read_text()
    documented = set(re.findall(r"`([a-z][a-z0-9_]+)`", doc))
    events = _logged_events()
    assert len(events) > 40
    missing = {name: where for name, where in events.items() if name not in documented}
    assert not missing, f"log events missing from docs/logging.md: {missing}"


# --------------------------------------------------------------------- one unit per account

TEMPLATE_UNIT = DEPLOY / "systemd" / "stream-supervisor@.service"


def test_template_unit_runs_one_account_of_the_accounts_file(tmp_path: Path) -> None:
    """`stream-supervisor@NAME` (docs/design.md, section 11): the instance name selects
    the account's section; its keys come as systemd credentials the file names, never
    through the environment."""
    service = _unit(TEMPLATE_UNIT)["Service"]
    assert _one(service, "Type") == "notify"
    assert str(EXIT_CONFIG) in _one(service, "RestartPreventExitStatus").split()
    exec_start = shlex.split(_one(service, "ExecStart"))
    assert exec_start[0].endswith("/stream-supervisor") and exec_start[1] == "run"
    env = dict(v.split("=", 1) for v in _values(service, "Environment"))
    assert env["STREAM_SUPERVISOR_ACCOUNT_NAME"] == "%i"
    assert env["STREAM_SUPERVISOR_ACCOUNTS_FILE"].endswith(".toml")
    assert not set(env) & SECRET_VARS
    credentials = [v.split(":", 1)[0] for v in _values(service, "LoadCredential")]
    assert credentials == ["%i-key-id", "%i-secret-key"]
    assert _seconds(_one(service, "TimeoutStopSec")) > float(
        env["STREAM_SUPERVISOR_DRAIN_TIMEOUT"])
    # The instance's credentials, as systemd would lay them out, read through a file
    # written the way the unit's comment says.
    from stream_supervisor.accounts import parse_accounts

    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "momentum-key-id").write_text("PKMOMENTUM\n")
    (creds / "momentum-secret-key").write_text("s3cret-momentum\n")
    doc = {"accounts": {"momentum": {
        "key_id_file": "${CREDENTIALS_DIRECTORY}/momentum-key-id",
        "secret_key_file": "${CREDENTIALS_DIRECTORY}/momentum-secret-key"}}}
    (spec,) = parse_accounts(doc, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert (spec.key_id, spec.secret_key, spec.problem) == ("PKMOMENTUM", "s3cret-momentum", None)
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return
    copy = tmp_path / "stream-supervisor@momentum.service"
    copy.write_text(TEMPLATE_UNIT.read_text().replace(
        "/opt/stream-supervisor/bin/stream-supervisor", sys.executable))
    result = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True,
                            text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    ours = [line for line in output.splitlines() if "stream-supervisor" in line]
    assert result.returncode == 0 and ours == [], output
