"""AdaOS's side, played by our own code: install, discover, start and check a fresh copy of this tree.

Each helper restates what one AdaOS function does (inimatic/adaos, read, not copied):

* ``source_accepted`` / ``install_copy`` / ``fingerprint_inputs``:
  ``services/nlu/neural_skill_installer.py`` (``_candidate_source_roots``, ``_copy_template_tree``,
  ``_source_fingerprint_payload``);
* ``read_manifest`` / ``service_spec`` / ``service_env`` / ``wait_ready``:
  ``services/skill/service_supervisor.py`` (``_read_skill_manifest``, ``_resolve_service_spec``,
  ``_ensure_started_owned``, ``_wait_ready``: any 2xx within 10 s, polled every 0.25 s);
* ``neural_stage_routed``: ``services/nlu/pipeline.py`` (``_use_neural_stage``, policy ``auto``);
* ``artifact_readiness`` / ``diagnose``: ``services/nlu/neural_service_bridge.py``
  (``_artifact_readiness``, ``diagnose_readiness``).

What AdaOS does and this does not: create the skill's venv and ``pip install -r requirements.in``
(the test runs the current interpreter, which has them), and the fixed port 18091 (a free port is
put into the copy's ``skill.yaml``, so parallel runs do not collide).

``test_embedded_default_model_readiness`` checks the committed default model and the flat mirror of it
in ``models/`` that AdaOS's readiness check reads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from skill.artifacts import ModelError, read_manifest, sha256_file, verify_model_dir, write_manifest
from skill.ranker import Ranker
from tests.conftest import REPO
from tools.bench_http import free_port

SKILL = "neural_nlu_service_skill"
IGNORED = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "*.egg-info")

# ------------------------------------------------------------------ AdaOS's side, restated


def source_accepted(root: Path) -> bool:
    """The installer takes a source tree only with ``skill.yaml`` and ``handlers/main.py``."""
    return (root / "skill.yaml").exists() and (root / "handlers" / "main.py").exists()


def install_copy(src: Path, target: Path) -> None:
    """Every file of the source tree into the target, without ``__pycache__`` / ``*.pyc``."""
    for item in sorted(src.rglob("*")):
        if "__pycache__" in item.parts or item.suffix == ".pyc":
            continue
        dst = target / item.relative_to(src)
        if item.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, dst)


def fingerprint_inputs(root: Path) -> dict[str, str]:
    """The files whose sha256 decide whether AdaOS prepares a new runtime slot for the skill."""
    files = {
        rel: hashlib.sha256((root / rel).read_bytes()).hexdigest()
        for rel in ("skill.yaml", "requirements.in", "README.md")
        if (root / rel).exists()
    }
    for tree in ("handlers", "scripts", "tests"):
        for path in sorted((root / tree).rglob("*.py")) if (root / tree).exists() else ():
            if "__pycache__" not in path.parts:
                files[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def fingerprint(root: Path) -> str:
    payload = {"files": fingerprint_inputs(root)}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def read_manifest_yaml(root: Path) -> dict[str, Any]:
    """``<skill root>/skill.yaml``, or {} (the supervisor never reads manifest.yaml)."""
    path = root / "skill.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.exists() else {}


def service_spec(root: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """What the supervisor derives from the manifest; None when it is not a usable service."""
    runtime = manifest.get("runtime") if isinstance(manifest.get("runtime"), dict) else {}
    if (runtime.get("kind") or "module") != "service":
        return None
    service = manifest.get("service") if isinstance(manifest.get("service"), dict) else {}
    port = int(service.get("port") or 0)
    command = service.get("command") or []
    if (
        port <= 0
        or not isinstance(command, list)
        or not all(isinstance(x, str) and x.strip() for x in command)
    ):
        return None
    workdir = service.get("workdir")
    deps = service.get("dependencies")
    deps = deps if isinstance(deps, list) else (manifest.get("dependencies") or [])
    requirements = root / "requirements.in" if (root / "requirements.in").exists() else None
    env = runtime.get("env") if isinstance(runtime.get("env"), dict) else {}
    health = service.get("healthcheck") if isinstance(service.get("healthcheck"), dict) else {}
    return {
        "host": str(service.get("host") or "127.0.0.1"),
        "port": port,
        "command": [str(x) for x in command],
        "workdir": (root / workdir).resolve() if isinstance(workdir, str) and workdir else root,
        "dependencies": [str(d) for d in deps if isinstance(d, str) and d.strip()],
        "requirements_file": requirements,
        "env_mode": str(env.get("mode") or ("venv" if deps or requirements else "global")),
        "python_selector": env.get("python") if isinstance(env.get("python"), str) else None,
        "health_path": str(health.get("path") or "/health"),
        "health_timeout_ms": int(health.get("timeout_ms") or 1000),
    }


def neural_stage_routed(skills_root: Path) -> bool:
    """The hub pipeline's ``auto`` policy: delegate to the neural stage iff the skill is installed."""
    return (skills_root / SKILL / "skill.yaml").exists()


def service_env(spec: dict[str, Any], base: Path) -> dict[str, str]:
    """The environment the supervisor gives the service process (on top of the hub's own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADAOS_", "NLU_"))}
    root = spec["workdir"]
    env.update(
        {
            "ADAOS_SERVICE_SKILL": SKILL,
            "ADAOS_SERVICE_HOST": spec["host"],
            "ADAOS_SERVICE_PORT": str(spec["port"]),
            "ADAOS_SERVICE_ROOT": str(root),
            "ADAOS_SERVICE_WORKDIR": str(spec["workdir"]),
            "ADAOS_SKILL_NAME": SKILL,
            "ADAOS_SKILL_PACKAGE": f"skills.{SKILL}",
            "ADAOS_SKILL_ROOT": str(root),
            "ADAOS_SKILL_MODE": "runtime",
            "ADAOS_BASE_DIR": str(base),
            "ADAOS_MODELS_DIR": str(base / "models"),
            "ADAOS_STATE_DIR": str(base / "state"),
            "ADAOS_LOGS_DIR": str(base / "logs"),
            "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
    )
    return env


def http_get(url: str, timeout_ms: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_ms / 1000.0) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_ready(spec: dict[str, Any], deadline_s: float = 10.0) -> float | None:
    """Seconds until the health path answered 2xx, or None within the supervisor's 10 s."""
    url = f"http://{spec['host']}:{spec['port']}{spec['health_path']}"
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        try:
            code, _ = http_get(url, spec["health_timeout_ms"])
            if 200 <= code < 300:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.25)
    return None


READINESS_REQUIRED = (
    "model.pt",
    "labels.json",
    "vocab.json",
    "examples_manifest.jsonl",
    "ranker_config.json",
    "metrics.json",
)
READINESS_OPTIONAL = (
    "intents_manifest.json",
    "intent_map.json",
    "faiss.index",
    "faiss.index.json",
    "negative_faiss.index",
    "negative_faiss.index.json",
    "example_index.pt",
    "negative_example_index.pt",
    "golden_report.json",
)
METRICS_READ = ("model_id", "model_sha256", "examples_total", "labels_total", "created_at")
METRICS_ISSUE_15 = ("vocab_size", "label_counts", "dev_accuracy", "dev_macro_f1", "gates", "artifact_files")


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def artifact_readiness(root: Path) -> dict[str, Any]:
    """AdaOS's artifact check of one folder: required files, index pairs, metrics and golden fields."""
    have = {name: (root / name).is_file() for name in (*READINESS_REQUIRED, *READINESS_OPTIONAL)}
    missing = [name for name in READINESS_REQUIRED if not have[name]]
    faiss_ok = have["faiss.index"] and have["faiss.index.json"]
    neg_ok = have["negative_faiss.index"] and have["negative_faiss.index.json"]
    index_backend = "faiss" if faiss_ok else "torch_tensor" if have["example_index.pt"] else None
    negative_backend = "faiss" if neg_ok else "torch_tensor" if have["negative_example_index.pt"] else None
    warnings = []
    if not index_backend and not missing:
        warnings.append("example_index_missing_until_first_model_load")
    if index_backend and not negative_backend:
        warnings.append("negative_example_index_missing_until_first_model_load")
    metrics = _json_or_empty(root / "metrics.json")
    golden = _json_or_empty(root / "golden_report.json")
    return {
        "ok": not missing,
        "missing_required": missing,
        "index_backend": index_backend,
        "negative_index_backend": negative_backend,
        "metrics": {key: metrics.get(key) for key in METRICS_READ},
        "golden_report": {
            "exists": bool(golden),
            **{k: golden.get(k) for k in ("accuracy", "passed", "total")},
        },
        "warnings": warnings,
    }


def diagnose(artifacts: dict[str, Any], installed: bool, health: dict[str, Any] | None) -> bool:
    """``diagnose_readiness``'s verdict; ``health`` is None when it does not start the service."""
    if health is None:
        return installed and bool(artifacts["ok"])
    template_ready = bool(health.get("template_backend_ready"))
    detector = bool(health.get("model_loaded")) or template_ready
    return installed and bool(health.get("ok")) and detector and (bool(artifacts["ok"]) or template_ready)


def readiness_problems(model_dir: Path) -> list[str]:
    """Everything AdaOS's check would miss in a model folder, plus the metrics keys of issue 15."""
    report = artifact_readiness(model_dir)
    problems = [f"missing {name}" for name in report["missing_required"]]
    if report["index_backend"] != "faiss":
        problems.append("no faiss.index + faiss.index.json pair")
    has_negatives = any(
        json.loads(line).get("negative")
        for line in (model_dir / "examples_manifest.jsonl").read_text().splitlines()
    )
    if has_negatives and report["negative_index_backend"] != "faiss":
        problems.append("no negative_faiss.index + negative_faiss.index.json pair")
    problems += [f"warning {w}" for w in report["warnings"]]
    problems += [f"metrics.json lacks {k}" for k, v in report["metrics"].items() if v in (None, "")]
    metrics = _json_or_empty(model_dir / "metrics.json")
    problems += [f"metrics.json lacks {k}" for k in METRICS_ISSUE_15 if k not in metrics]
    golden = report["golden_report"]
    if not golden["exists"] or not isinstance(golden["total"], int) or not isinstance(golden["passed"], int):
        problems.append("no golden_report.json with passed / total")
    return problems


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A checkout named as AdaOS's workspace names it, installed into a node's skills dir."""
    tmp = tmp_path_factory.mktemp("adaos")
    source = tmp / "checkout" / SKILL
    shutil.copytree(REPO, source, ignore=IGNORED)
    base = tmp / "base"
    skills = base / "skills"
    target = skills / SKILL
    # ADAOS_NEURAL_NLU_SKILL_SOURCE=<checkout>: the first accepted candidate is copied over the target.
    assert source_accepted(source)
    install_copy(source, target)
    for sub in ("state", "logs", "models"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    return {"source": source, "base": base, "skills": skills, "target": target}


@pytest.fixture(scope="module")
def fresh_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained now by ``tools.train`` (the catalog has golden cases, one via regex)."""
    from test_train import TINY, write_tiny_catalog  # noqa: PLC0415 - tests dir is on sys.path

    from tools import train as trainer  # noqa: PLC0415 - torch only here

    tiny = copy.deepcopy(TINY)
    alarm = next(i for i in tiny["intents"] if i["intent"] == "alarm.set")
    alarm["slots"] = {"time": {"source": "time"}}
    alarm["regex"] = [
        {"id": "alarm_en", "locale": "en", "priority": 50, "pattern": r"^set an alarm for \{time\}$"}
    ]
    alarm["golden"] = [{"text": "set an alarm for 7:30", "locale": "en", "slots": {"time": "07:30"}}]
    weather = next(i for i in tiny["intents"] if i["intent"] == "weather.get")
    weather["golden"] = [{"text": "what is the weather", "locale": "en"}]
    tmp = tmp_path_factory.mktemp("fresh")
    catalog = write_tiny_catalog(tmp / "catalog")
    (catalog / "intents" / "tiny.yaml").write_text(yaml.safe_dump(tiny, allow_unicode=True), encoding="utf-8")
    out = tmp / "models"
    code = trainer.main(["--catalog", str(catalog), "--out", str(out), "--quiet", "--activate"])
    assert code == 0
    return out / json.loads((out / "active.json").read_text(encoding="utf-8"))["model_id"]


@pytest.fixture
def started(node: dict[str, Path], request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The installed skill started the supervisor's way, with the manifest's (or a patched) command."""
    target = node["target"]
    manifest = read_manifest_yaml(target)
    manifest["service"]["port"] = free_port()
    if getattr(request, "param", None):
        manifest["service"]["command"] = request.param
    (target / "skill.yaml").write_text(yaml.safe_dump(manifest, allow_unicode=True), encoding="utf-8")
    spec = service_spec(target, read_manifest_yaml(target))
    assert spec is not None
    env = service_env(spec, node["base"])
    log = (node["base"] / "logs" / f"service.{SKILL}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, *spec["command"]], cwd=spec["workdir"], env=env, stdout=log, stderr=log
    )
    try:
        yield {"spec": spec, "env": env, "proc": proc, "waited": wait_ready(spec)}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.copy2(node["source"] / "skill.yaml", target / "skill.yaml")


# ------------------------------------------------------------------ install and discovery


def test_installer_accepts_only_a_tree_with_skill_yaml_and_handlers_main(
    node: dict[str, Path], tmp_path: Path
) -> None:
    assert source_accepted(node["source"]) and source_accepted(node["target"])
    bare = tmp_path / SKILL
    shutil.copytree(node["source"], bare, ignore=shutil.ignore_patterns("handlers"))
    assert not source_accepted(bare)
    (bare / "skill.yaml").unlink()
    shutil.copytree(node["source"] / "handlers", bare / "handlers")
    assert not source_accepted(bare)


def test_installed_copy_has_the_sources_fingerprint(node: dict[str, Path], tmp_path: Path) -> None:
    inputs = fingerprint_inputs(node["target"])
    for rel in (
        "skill.yaml",
        "requirements.in",
        "README.md",
        "handlers/main.py",
        "tests/test_adaos_dropin.py",
    ):
        assert rel in inputs
    assert not any("__pycache__" in rel for rel in inputs)
    assert fingerprint(node["target"]) == fingerprint(node["source"])
    # A release bumps skill.yaml's version: that alone makes AdaOS prepare a new runtime slot
    # (the service's own code under skill/ is not among the fingerprint's inputs).
    bumped = tmp_path / SKILL
    install_copy(node["source"], bumped)
    doc = yaml.safe_load((bumped / "skill.yaml").read_text(encoding="utf-8"))
    doc["version"] = "0.1.1"
    (bumped / "skill.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    assert fingerprint(bumped) != fingerprint(node["source"])


def test_supervisor_discovers_the_service(node: dict[str, Path]) -> None:
    target = node["target"]
    assert neural_stage_routed(node["skills"])  # not neural_base_url_unresolved
    spec = service_spec(target, read_manifest_yaml(target))
    assert spec is not None, "skill.yaml does not describe a service AdaOS can start"
    assert spec["host"] == "127.0.0.1" and spec["port"] == 18091
    assert spec["command"] in (["-m", "skill"], ["-m", "handlers.main"])
    assert spec["workdir"] == target
    assert spec["health_path"] == "/health" and spec["health_timeout_ms"] == 1000
    assert spec["env_mode"] == "venv" and spec["python_selector"] == "3.11"
    assert spec["requirements_file"] == target / "requirements.in" and spec["dependencies"] == []
    assert f"http://{spec['host']}:{spec['port']}" == "http://127.0.0.1:18091"


# ------------------------------------------------------------------ start, health, parse


@pytest.mark.parametrize(
    "started", [None, ["-m", "handlers.main"]], indirect=True, ids=["manifest", "handlers"]
)
def test_started_by_the_supervisor_is_healthy_within_10_s(
    started: dict[str, Any], node: dict[str, Path]
) -> None:
    spec, proc = started["spec"], started["proc"]
    log = (node["base"] / "logs" / f"service.{SKILL}.log").read_text(errors="replace")
    assert started["waited"] is not None, f"no 2xx from /health within 10 s:\n{log[-3000:]}"
    assert proc.poll() is None
    base_url = f"http://{spec['host']}:{spec['port']}"
    code, health = http_get(base_url + "/health", 2000)
    assert code == 200
    assert health["ok"] is True and health["model_loaded"] is True and health["model_id"]
    assert health["template_backend_ready"] is True and health["service"] and health["version"]
    # The copy serves its own code and its embedded model, not the checkout the tests run from.
    probe = subprocess.run(
        [sys.executable, "-c", "import skill, skill.config as c; print(skill.__file__); print(c.REPO_ROOT)"],
        cwd=spec["workdir"],
        env=started["env"],
        capture_output=True,
        text=True,
        check=True,
    )
    module_file, repo_root = probe.stdout.split()
    assert Path(module_file).is_relative_to(node["target"]) and Path(repo_root) == node["target"]
    embedded = json.loads((node["target"] / "models" / "active.json").read_text(encoding="utf-8"))["model_id"]
    assert health["model_id"] == embedded
    # What AdaOS's bridge posts (parse_text): locale twice, preferred locales, the resolver's output.
    entities = {
        "normalized_text": "открой маркетплейс",
        "resolved_entities": [],
        "ambiguities": [],
        "unresolved_entity_spans": [],
    }
    body = {
        "text": "открой маркетплейс",
        "webspace_id": "desktop",
        "locale": "ru",
        "request_locale": "ru",
        "preferred_locales": ["ru", "en"],
        "entities": entities,
        "canonicalized_text": "открой маркетплейс",
    }
    req = urllib.request.Request(
        base_url + "/parse", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        parsed = json.loads(resp.read())
    result = parsed["result"]
    assert parsed["ok"] is True and isinstance(result["top_intent"], str) and result["model_id"] == embedded
    assert isinstance(result["confidence"], float) and len(result["alternatives"]) <= 4
    # diagnose_readiness(start_service=True): installed, healthy, a detector ready -> ok.
    root = node["base"] / "state" / "nlu" / "neural"
    assert diagnose(artifact_readiness(root), neural_stage_routed(node["skills"]), health) is True
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_readiness_without_starting_reads_the_served_version(
    node: dict[str, Path], fresh_model: Path
) -> None:
    """AdaOS reads the artifact root flat; activation mirrors the served version there (symlinks)."""
    root = node["base"] / "state" / "nlu" / "neural"
    shutil.copytree(fresh_model.parent, root, dirs_exist_ok=True)  # the node serves the fresh model
    assert diagnose(artifact_readiness(root), neural_stage_routed(node["skills"]), None) is True
    assert (fresh_model.parent / "model.pt").is_symlink()
    assert (fresh_model.parent / "model.pt").resolve() == (fresh_model / "model.pt").resolve()


# ------------------------------------------------------------------ artifacts


def test_fresh_model_has_everything_adaos_reads(fresh_model: Path) -> None:
    assert readiness_problems(fresh_model) == []
    manifest = verify_model_dir(fresh_model)
    listed = {f.path for f in manifest.files}
    on_disk = {p.name for p in fresh_model.iterdir()}
    assert on_disk == listed | {"manifest.json"}
    metrics = json.loads((fresh_model / "metrics.json").read_text(encoding="utf-8"))
    assert sorted(metrics["artifact_files"]) == sorted(on_disk)
    assert metrics["model_id"] == fresh_model.name == manifest.model_id
    assert metrics["model_sha256"] == sha256_file(fresh_model / "model.onnx")
    assert metrics["state_dict_sha256"] == sha256_file(fresh_model / "model.pt")
    cfg = json.loads((fresh_model / "ranker_config.json").read_text(encoding="utf-8"))
    labels = json.loads((fresh_model / "labels.json").read_text(encoding="utf-8"))
    assert labels == cfg["intents"] and metrics["labels_total"] == len(labels)
    rows = [json.loads(line) for line in (fresh_model / "examples_manifest.jsonl").read_text().splitlines()]
    for name, negative, role in (
        ("faiss.index", False, "positive_examples"),
        ("negative_faiss.index", True, "negative_examples"),
    ):
        meta = json.loads((fresh_model / f"{name}.json").read_text(encoding="utf-8"))
        subset = [r for r in rows if bool(r.get("negative")) == negative]
        digest = hashlib.sha256(
            b"".join(f"{r['intent']}\0{r['text']}\0{r.get('locale', '')}\n".encode() for r in subset)
        ).hexdigest()
        assert (
            meta["backend"] == "faiss" and meta["metric"] == "inner_product" and meta["schema_version"] == 1
        )
        assert meta["index_role"] == role and meta["model_id"] == fresh_model.name
        assert meta["model_sha256"] == metrics["model_sha256"]
        assert meta["example_count"] == len(subset) and meta["examples_digest"] == digest
    assert metrics["examples_total"] == sum(not r.get("negative") for r in rows)
    assert metrics["label_counts"] == {
        i: sum(r["intent"] == i for r in rows if not r.get("negative")) for i in labels
    }
    assert 0.0 <= metrics["dev_macro_f1"] <= 1.0 and metrics["dev_accuracy"] == metrics["val_accuracy"]
    assert metrics["gates"]["thresholds"] == cfg["thresholds"]
    golden = json.loads((fresh_model / "golden_report.json").read_text(encoding="utf-8"))
    assert golden["total"] == 2 == len(golden["cases"])
    assert golden["passed"] == sum(c["passed"] for c in golden["cases"])
    assert golden["accuracy"] == golden["passed"] / golden["total"]
    regex_case = next(c for c in golden["cases"] if c["text"] == "set an alarm for 7:30")
    assert (
        regex_case["passed"] and regex_case["via"] == "regex" and regex_case["got_slots"] == {"time": "07:30"}
    )
    assert metrics["gates"]["golden"] == {
        "passed": golden["passed"],
        "total": 2,
        "ok": golden["passed"] == 2,
    }


def test_model_pt_is_the_served_network_in_fp32(fresh_model: Path) -> None:
    """torch.load(weights_only=True) gives the state_dict of the network model.onnx was exported from."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415 - training-only dependency

    from skill.features import Featurizer  # noqa: PLC0415
    from tools._model import Net, NetConfig  # noqa: PLC0415
    from tools.export import run_batched, session  # noqa: PLC0415

    state = torch.load(fresh_model / "model.pt", weights_only=True)
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in state.values())
    cfg = json.loads((fresh_model / "ranker_config.json").read_text(encoding="utf-8"))
    net = Net(msgspec.convert(cfg["net"], NetConfig))
    net.load_state_dict(state, strict=True)
    net.eval()
    feat = Featurizer.load(fresh_model / "vocab.json")
    texts = [
        json.loads(line)["text"]
        for line in (fresh_model / "examples_manifest.jsonl").read_text().splitlines()
    ]
    onnx_probs, onnx_emb = run_batched(session(fresh_model / "model.onnx"), feat, texts)
    with torch.no_grad():
        rows = []
        for text in texts:  # one at a time: no padding differences against the exported graph
            enc = feat.encode([text])
            out = net(torch.from_numpy(enc.chars), torch.from_numpy(enc.words), torch.from_numpy(enc.ngrams))
            rows.append((out[0].numpy()[0], out[1].numpy()[0]))
    torch_probs = np.stack([r[0] for r in rows])
    torch_emb = np.stack([r[1] for r in rows])
    # model.onnx is the int8 quantization of these weights: same decisions, near-identical embeddings.
    assert (torch_probs.argmax(1) == onnx_probs.argmax(1)).mean() >= 0.95
    cosine = (torch_emb * onnx_emb).sum(1) / (
        np.linalg.norm(torch_emb, axis=1) * np.linalg.norm(onnx_emb, axis=1)
    )
    assert cosine.min() > 0.9 and cosine.mean() > 0.98
    # Other weights would not match: a shuffled state_dict is a different network.
    wrong = {k: v[torch.randperm(v.shape[0])] if v.ndim else v for k, v in state.items()}
    net.load_state_dict(wrong)
    with torch.no_grad():
        enc = feat.encode(texts[:1])
        _, emb = net(torch.from_numpy(enc.chars), torch.from_numpy(enc.words), torch.from_numpy(enc.ngrams))
    assert float((emb.numpy()[0] * onnx_emb[0]).sum()) < 0.98


def test_a_state_dict_with_other_pickled_objects_is_refused(fresh_model: Path, tmp_path: Path) -> None:
    import torch  # noqa: PLC0415

    model = tmp_path / fresh_model.name
    shutil.copytree(fresh_model, model)
    torch.save({"w": torch.zeros(2), "hook": print}, model / "model.pt")  # names print
    with pytest.raises(ModelError, match=r"the pickle names (__builtin__|builtins)\.print"):
        write_manifest(model, model_id=model.name)
    manifest = read_manifest(model)
    entries = [
        {"path": f.path, "sha256": sha256_file(model / f.path), "bytes": (model / f.path).stat().st_size}
        for f in manifest.files
    ]
    raw = json.loads((model / "manifest.json").read_text(encoding="utf-8"))
    (model / "manifest.json").write_text(json.dumps({**raw, "files": entries}), encoding="utf-8")
    with pytest.raises(ModelError, match="not a tensor"):
        verify_model_dir(model)  # the hashes match; the content is still refused


def test_folders_with_the_previous_names_still_load_and_verify(fresh_model: Path, tmp_path: Path) -> None:
    """A version written before issue 15: faiss_negatives.index, none of AdaOS's files."""
    from tools import models as cli  # noqa: PLC0415

    root = tmp_path / "node"
    old = root / fresh_model.name
    shutil.copytree(fresh_model, old)
    for name in (
        "model.pt",
        "labels.json",
        "faiss.index.json",
        "negative_faiss.index.json",
        "golden_report.json",
    ):
        (old / name).unlink()
    (old / "negative_faiss.index").rename(old / "faiss_negatives.index")
    write_manifest(
        old, **{k: v for k, v in msgspec.to_builtins(read_manifest(fresh_model)).items() if k != "files"}
    )
    ranker = Ranker.load(old)
    assert ranker._negatives is not None and ranker._negatives.ntotal == len(ranker._neg) > 0
    assert cli.main(["--root", str(root), "verify"]) == 0
    other = tmp_path / "other"
    assert cli.main(["--root", str(other), "import", str(old)]) == 0
    assert (
        cli.main(["--root", str(other), "import", str(fresh_model)]) == 1
    )  # same id: versions are immutable
    assert Ranker.load(other / fresh_model.name).model_id == fresh_model.name


def test_embedded_default_model_readiness() -> None:
    pointer = json.loads((REPO / "models" / "active.json").read_text(encoding="utf-8"))
    model_dir = REPO / "models" / pointer["model_id"]
    verify_model_dir(model_dir)
    assert readiness_problems(model_dir) == []
    # The repository's model root carries the flat mirror AdaOS reads (python -m tools.models promote
    # and tools.train --activate keep it).
    assert artifact_readiness(REPO / "models")["ok"]
    assert (REPO / "models" / "model.onnx").resolve() == (model_dir / "model.onnx").resolve()
