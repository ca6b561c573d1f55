"""skill.yaml as AdaOS validates it: one document with manifest.yaml, both AdaOS schemas, one dependency list.

The schema rules below are restated from reading AdaOS's two manifest schemas (inimatic/adaos,
``src/adaos/abi/skill.schema.json``, draft-07, and ``src/adaos/services/skill/skill_schema.json``,
2020-12, which ``services/skill/validation.py`` applies at install time); their files are not copied.
Only the parts that concern the keys this skill uses are restated, the stricter of the two where
they differ (``permissions`` is an enum in the first, free strings in the second).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:[-+][0-9A-Za-z.-]+)?$")
TOPIC = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
RUNTIME_KEYS = {"kind", "python", "env", "node", "deno", "bash", "activation", "sdk_only"}
ENV_KEYS = {"mode", "python", "venv_dir"}
SERVICE_KEYS = {"host", "port", "command", "workdir", "healthcheck", "ui", "storage", "self_managed"}
HEALTH_KEYS = {"type", "path", "timeout_ms"}
PERMISSIONS = {"network", "filesystem", "microphone", "speaker", "camera", "process", "gpu"}


def _strings(value: Any, where: str, *, unique: bool = True, min_items: int = 0) -> list[str]:
    problems = []
    if not isinstance(value, list):
        return [f"{where}: must be a list"]
    if len(value) < min_items:
        problems.append(f"{where}: needs at least {min_items} item(s)")
    if any(not isinstance(v, str) or not v for v in value):
        problems.append(f"{where}: items must be non-empty strings")
    elif unique and len(set(value)) != len(value):
        problems.append(f"{where}: items must be unique")
    return problems


def schema_problems(doc: Any) -> list[str]:
    """Where ``doc`` breaks AdaOS's manifest schemas (empty: it fits both)."""
    if not isinstance(doc, dict):
        return ["$: must be a mapping"]
    out: list[str] = []
    for key in ("name", "version"):
        if not isinstance(doc.get(key), str) or not doc.get(key):
            out.append(f"{key}: required non-empty string")
    if isinstance(doc.get("name"), str) and not re.fullmatch(r"[a-z0-9_.-]+", doc["name"]):
        out.append("name: must match ^[a-z0-9_.-]+$")
    if isinstance(doc.get("version"), str) and not SEMVER.match(doc["version"]):
        out.append("version: must be a semantic version")
    if "description" in doc and not isinstance(doc["description"], str):
        out.append("description: must be a string")
    runtime = doc.get("runtime")
    if runtime is not None:
        if not isinstance(runtime, dict) or not runtime:
            out.append("runtime: must be a non-empty mapping")
        else:
            out += [f"runtime.{k}: not allowed" for k in sorted(set(runtime) - RUNTIME_KEYS)]
            if runtime.get("kind", "module") not in ("module", "service"):
                out.append("runtime.kind: module or service")
            if "python" in runtime and not isinstance(runtime["python"], str):
                out.append("runtime.python: must be a string")
            env = runtime.get("env")
            if env is not None:
                if not isinstance(env, dict):
                    out.append("runtime.env: must be a mapping")
                else:
                    out += [f"runtime.env.{k}: not allowed" for k in sorted(set(env) - ENV_KEYS)]
                    if env.get("mode", "global") not in ("global", "venv"):
                        out.append("runtime.env.mode: global or venv")
                    for k in ("python", "venv_dir"):
                        if k in env and not isinstance(env[k], str):
                            out.append(f"runtime.env.{k}: must be a string")
    service = doc.get("service")
    if service is not None:
        if not isinstance(service, dict):
            out.append("service: must be a mapping")
        else:
            out += [f"service.{k}: not allowed" for k in sorted(set(service) - SERVICE_KEYS)]
            if "host" in service and not isinstance(service["host"], str):
                out.append("service.host: must be a string")
            port = service.get("port")
            if port is not None and (
                not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535
            ):
                out.append("service.port: integer in [1, 65535]")
            if "command" in service:
                out += _strings(service["command"], "service.command", unique=False, min_items=1)
            health = service.get("healthcheck")
            if health is not None:
                if not isinstance(health, dict):
                    out.append("service.healthcheck: must be a mapping")
                else:
                    out += [
                        f"service.healthcheck.{k}: not allowed" for k in sorted(set(health) - HEALTH_KEYS)
                    ]
                    if health.get("type", "http") != "http":
                        out.append("service.healthcheck.type: http")
                    if "path" in health and not isinstance(health["path"], str):
                        out.append("service.healthcheck.path: must be a string")
                    t = health.get("timeout_ms", 1000)
                    if not isinstance(t, int) or isinstance(t, bool) or t < 100:
                        out.append("service.healthcheck.timeout_ms: integer >= 100")
    if "dependencies" in doc:
        out += _strings(doc["dependencies"], "dependencies")
    if "permissions" in doc:
        perms = doc["permissions"]
        out += _strings(perms, "permissions")
        if isinstance(perms, list):
            out += [
                f"permissions: {p!r} is not one of {sorted(PERMISSIONS)}"
                for p in perms
                if p not in PERMISSIONS
            ]
    events = doc.get("events")
    if events is not None:
        if not isinstance(events, dict):
            out.append("events: must be a mapping")
        else:
            out += [f"events.{k}: not allowed" for k in sorted(set(events) - {"subscribe", "publish"})]
            for k in ("subscribe", "publish"):
                if k in events:
                    out += _strings(events[k], f"events.{k}")
                    out += [
                        f"events.{k}: {t!r} is no topic" for t in events[k] or [] if not TOPIC.match(str(t))
                    ]
    if "tools" in doc:  # AdaOS requires at least one tool when the key is there
        out += ["tools: needs at least one item"] if not doc["tools"] else []
    return out


def load(name: str) -> Any:
    return yaml.safe_load((REPO / name).read_text(encoding="utf-8"))


def test_skill_yaml_and_manifest_yaml_are_one_document() -> None:
    """AdaOS reads skill.yaml; the design calls it manifest.yaml. Byte for byte the same file."""
    assert (REPO / "manifest.yaml").read_bytes() == (REPO / "skill.yaml").read_bytes(), (
        "skill.yaml and manifest.yaml differ: edit skill.yaml, then cp skill.yaml manifest.yaml"
    )


def test_skill_yaml_fits_adaos_schemas() -> None:
    doc = load("skill.yaml")
    assert schema_problems(doc) == []
    assert doc["name"] == "neural_nlu_service_skill"
    assert doc["runtime"]["kind"] == "service"
    assert doc["service"]["port"] == 18091
    assert doc["service"]["healthcheck"]["path"] == "/health"
    assert doc["service"]["command"] in (["-m", "skill"], ["-m", "handlers.main"])
    assert set(doc["supported_locales"]) == {"ru", "en"}
    # AdaOS's hub pipeline loads skill.yaml `nlu.regex_rules` of every skill into its own regex stage.
    assert "nlu" not in doc


@pytest.mark.parametrize(
    ("patch", "problem"),
    [
        ({"permissions": ["net.loopback"]}, "permissions"),
        (
            {"service": {"port": 18091, "command": ["-m", "skill"], "dependencies": ["numpy"]}},
            "service.dependencies",
        ),
        ({"service": {"port": 0, "command": ["-m", "skill"]}}, "service.port"),
        ({"service": {"port": 18091, "command": []}}, "service.command"),
        ({"runtime": {"kind": "daemon"}}, "runtime.kind"),
        (
            {"runtime": {"kind": "service", "env": {"mode": "venv", "allow_heavy_dependencies": True}}},
            "runtime.env",
        ),
        ({"version": "0.1"}, "version"),
        ({"events": {"subscribe": ["nlp intent"]}}, "events.subscribe"),
    ],
)
def test_the_schema_check_catches_what_adaos_refuses(patch: dict[str, Any], problem: str) -> None:
    doc = {**load("skill.yaml"), **patch}
    problems = schema_problems(doc)
    assert any(p.startswith(problem) for p in problems), problems


def test_requirements_in_is_the_runtime_dependency_list() -> None:
    """AdaOS pip-installs requirements.in into the skill's venv: exactly pyproject's run-time list."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = [
        line.strip()
        for line in (REPO / "requirements.in").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines == project["dependencies"]
    assert not any(re.match(r"(torch|llama)", dep) for dep in lines)  # the service stays torch-free


def test_handlers_main_is_the_same_entry_point() -> None:
    """``python -m handlers.main`` is ``python -m skill``: same flags, same help, same exit codes."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=60
        )

    a, b = run("-m", "skill", "--help"), run("-m", "handlers.main", "--help")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and "--models-dir" in a.stdout
    bad = run("-m", "handlers.main", "--port", "not-a-port")
    assert bad.returncode == 2
