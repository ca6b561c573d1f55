"""Hostile input over real HTTP: the real ``python -m skill`` process against hypothesis and schemathesis.

One service process (loopback, state and logs in tmp_path) takes random JSON, deep nesting, huge
strings, control characters, invalid UTF-8, lone surrogates, mixed scripts, random methods and paths,
and schema-driven cases generated from the ``/openapi.json`` it serves (valid and invalid). Every
answer must be a defined status with a JSON body (errors in the one error shape), never a 500, and
the process must still be alive, healthy and exit 0 on SIGTERM at the end. The CI part runs a few
hundred cases; ``NLU_SLOW=1`` (or ``-m slow``) runs thousands.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from skill.security import authorize
from tests.conftest import REPO
from tools.bench_http import free_port

# Hypothesis keeps caches (constants, charmap) under ./.hypothesis, some at import time: not in the work tree.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "adaos-nlu-hypothesis")


_SKIP_UNLESS_SLOW = pytest.mark.skipif(
    "os.environ.get('NLU_SLOW') != '1' and 'slow' not in (config.option.markexpr or '')",
    reason="slow: set NLU_SLOW=1 or run `python -m pytest -m slow`",
)
FULL = pytest.param("full", marks=[pytest.mark.slow, _SKIP_UNLESS_SLOW])
BUDGETS = ["quick", FULL]
# Examples per fuzz test: (CI, full).
EXAMPLES = {"quick": 40, "full": 600}

API_JSON_PATHS = {"/parse", "/health", "/reindex", "/openapi.json", "/ui/status.json"}  # /metrics: Prometheus
DEFINED = {200, 400, 401, 403, 404, 405, 413, 503}
MAX_BODY = 64 * 1024
STATS: Counter[str] = Counter()


class Service:
    """A real service process on a free loopback port."""

    def __init__(self, root: Path, env_extra: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.root = root
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ADAOS_", "NLU_"))}
        env["ADAOS_STATE_DIR"] = str(root / "state")  # an empty node: the embedded model (if any) serves
        env["ADAOS_LOGS_DIR"] = str(root / "logs")
        env.update(env_extra or {})
        self.log = root / "service.log"
        cmd = [sys.executable, "-m", "skill", "--port", str(self.port), "--log-level", "INFO"]
        if os.environ.get("NLU_TEST_MODELS_DIR"):  # fuzz a given model root instead of the embedded one
            cmd += ["--models-dir", os.environ["NLU_TEST_MODELS_DIR"]]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.conn: http.client.HTTPConnection | None = None

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, limit_s: float = 60.0) -> None:
        """Until /health answers 200 (the model, if any, is loaded)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("service not healthy in time")

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a kept-alive connection (reconnecting once if the server closed it)."""
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
                hdrs = {k.lower(): v for k, v in resp.getheaders()}
                if hdrs.get("connection", "").lower() == "close":
                    self.close_conn()
                return resp.status, hdrs, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close_conn()
                assert self.proc.poll() is None, "the service died"
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close_conn(self) -> None:
        """Drop the kept-alive connection."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def stop(self) -> int:
        """SIGTERM and wait."""
        self.close_conn()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


def check_answer(  # noqa: PLR0917 - one call shape for every kind of case
    kind: str,
    method: str,
    path: str,
    status: int,
    headers: dict[str, str],
    data: bytes,
    sent: bytes | None = None,
) -> None:
    """A defined status; JSON for the API; the one error shape for every error; never a 500."""
    STATS[kind] += 1
    STATS["total"] += 1
    try:
        assert status in DEFINED, f"status {status}"
        if method == "HEAD":
            return
        is_json = headers.get("content-type", "").startswith("application/json")
        if status >= 400 or path.split("?", 1)[0] in API_JSON_PATHS:
            assert is_json, f"content-type {headers.get('content-type')!r}"
        if not is_json:
            return
        body = json.loads(data)
        if status >= 400:
            assert isinstance(body, dict) and body.get("ok") is False, body
            assert isinstance(body.get("error"), str) and body["error"], body
            assert isinstance(body.get("message"), str) and body["message"], body
            assert "field" in body and (body["field"] is None or isinstance(body["field"], str)), body
            assert body["error"] != "internal_error", body
        elif path == "/parse":
            assert body["ok"] is True and body["result"]["top_intent"] == body["top_intent"], body
            assert body["decision"] in {"accept", "abstain", "reject"}, body
            assert 0.0 <= body["confidence"] <= 1.0 and len(body["alternatives"]) <= 4, body
    except (AssertionError, ValueError, KeyError, TypeError) as exc:
        STATS["failures"] += 1
        raise AssertionError(
            f"{kind}: {method} {path} -> {status} {data[:300]!r} (sent {(sent or b'')[:200]!r}): {exc}"
        ) from exc


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The real process; afterwards it must be alive, healthy, clean in its log and exit 0."""
    svc = Service(tmp_path_factory.mktemp("fuzz"))
    try:
        svc.wait_healthy()
        yield svc
        assert svc.proc.poll() is None, "the service died during fuzzing"
        status, _, data = svc.request("GET", "/health")
        assert status == 200, data
        _, _, metrics = svc.request("GET", "/metrics")
        assert b'nlu_audit_records_total{result="failed"} 0.0' in metrics
    finally:
        code = svc.stop()
        print(
            f"\nfuzz: {STATS['total']} cases, {STATS['failures']} failures; by kind: "
            + ", ".join(f"{k}={v}" for k, v in sorted(STATS.items()) if k not in {"total", "failures"})
        )
    assert code == 0, svc.log.read_text(errors="replace")[-3000:]
    log = svc.log.read_text(errors="replace")
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
    audit_path = svc.root / "logs" / "nlu_decisions.jsonl"
    audit = audit_path.read_bytes() if audit_path.exists() else b""
    assert audit == b"" or audit.endswith(b"\n")
    for line in audit.split(b"\n")[:-1]:  # JSON lines end with \n only (U+2028 inside a text is data)
        json.loads(line)  # every audit line is whole JSON


def run_fuzz(strategy: st.SearchStrategy[Any], n: int, body: Callable[[Any], None]) -> None:
    """``body`` for ``n`` examples drawn from ``strategy`` (no example database: tmp only)."""

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def inner(value: Any) -> None:
        body(value)

    inner()


# --- strategies -------------------------------------------------------------------------------

JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50)
JSON = st.recursive(
    JSON_LEAF,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=10), kids, max_size=5),
    max_leaves=30,
)
SCRIPTS = (
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВЁ"  # Cyrillic
    "abcdefghijklmnopqrstuvwxyzABC0123456789:.,!?-'\" "
    "日本語中文한국어ひらがなカタカナ"  # CJK
    "العربيةעברית"  # RTL
    "ελληνικάհայերենქართული"  # Greek, Armenian, Georgian
    "\u0301\u0308\u200b\u200c\u200d\u200e\u200f\u202a\u202e\u2066\ufeff\u00a0\u3000"  # marks, bidi, ZW
    "😀👍🏽🇷🇺👨‍👩‍👧"  # emoji, ZWJ sequences
    "\x00\x01\x07\x08\x0b\x0c\x1b\x7f\x85\u2028\u2029\t\n\r"  # control characters
    "{}[]<>$^*+()|\\"  # placeholder and regex syntax
)
MIXED_TEXT = st.text(alphabet=st.sampled_from(SCRIPTS), min_size=1, max_size=1100)
ANY_TEXT = st.text(max_size=1100)  # every code point, lone surrogates included (sent as \ud800 escapes)
FIELDS = (
    "text",
    "webspace_id",
    "locale",
    "request_locale",
    "preferred_locales",
    "canonicalized_text",
    "entities",
    "request_id",
)
LOCALES = st.sampled_from(["ru", "en", "ru-RU", "en_US", "EN", "de", "", " ", "zz-ZZ", "ру", "en-", "-"])
PARSE_BODY = st.fixed_dictionaries(
    {"text": MIXED_TEXT | ANY_TEXT},
    optional={
        "locale": LOCALES | JSON_LEAF,
        "request_locale": LOCALES | JSON_LEAF,
        "preferred_locales": st.lists(LOCALES | JSON_LEAF, max_size=4) | LOCALES | JSON_LEAF,
        "webspace_id": st.text(max_size=30) | JSON_LEAF,
        "request_id": st.text(max_size=80) | JSON_LEAF,
        "canonicalized_text": st.text(max_size=100) | JSON_LEAF,
        "entities": JSON,
        "extra": JSON,
    },
)
REAL = [
    "поставь будильник на 7:30",
    "turn off the kitchen light",
    "выключи свет в спальне",
    "what time is it",
    "напомни мне купить хлеб через 10 минут",
    "какая погода в Москве завтра",
]


@st.composite
def deep_nesting(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(1, 40_000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'[{"b":', b"}]")]))
    leaf = draw(st.sampled_from([b"1", b'"x"', b"null", b"{}"]))
    where = draw(st.sampled_from(["entities", "text", "top"]))
    nested = opener * depth + leaf + closer * draw(st.sampled_from([depth, max(0, depth - 1)]))
    if where == "top":
        return nested
    return b'{"text": "hi", "' + where.encode() + b'": ' + nested + b"}"


@st.composite
def huge_body(draw: st.DrawFn) -> bytes:
    size = draw(
        st.sampled_from([999, 1000, 1001, 5000, 60_000, MAX_BODY - 20, MAX_BODY, MAX_BODY + 1, 100_000])
    )
    char = draw(st.sampled_from(["a", "я", "😀", " ", "\\u0000", "7:30 ", "{device} "]))
    text = (char * (size // len(char) + 1))[:size]
    field = draw(st.sampled_from(["text", "request_id", "webspace_id", "pad"]))
    body = {"text": "hi", field: text}
    return json.dumps(body, ensure_ascii=draw(st.booleans())).encode()


METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
PATHS = st.sampled_from(
    [
        "/parse",
        "/health",
        "/reindex",
        "/openapi.json",
        "/metrics",
        "/",
        "/ui",
        "/ui/status.json",
        "/ui/static/../../etc/passwd",
        "/ui/static/%00",
        "/parse/",
        "/PARSE",
        "/parse?x=1",
        "//parse",
        "/nope",
        "/%ff%fe",
        "/" + "a" * 2000,
    ]
)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        "",
    ]
)


# --- tests --------------------------------------------------------------------------------------


def _post(service: Service, kind: str, body: bytes, content_type: str = "application/json") -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    status, hdrs, data = service.request("POST", "/parse", body, headers)
    check_answer(kind, "POST", "/parse", status, hdrs, data, body)


def test_real_utterances_answer(service: Service) -> None:
    for text in REAL:
        _post(service, "real", json.dumps({"text": text}).encode())


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": "\x80"}',  # invalid UTF-8 inside a string (was a 500: UnicodeDecodeError)
        b'{"text": "ok \xc3\x28 ok"}',
        b'{"text": "\xed\xa0\x80"}',  # a UTF-8-encoded surrogate
        b'{"text": "hi", "entities": {"a": '
        + b"[" * 30_000
        + b"]" * 30_000
        + b"}}",  # was a 500: RecursionError
        b'{"text": "hi", "entities": ' + b'{"a":' * 5_000 + b"1" + b"}" * 5_000 + b"}",
        b'{"text": "hi", "entities": {"a": ' + b"[" * 60_000,  # deep and unterminated
    ],
    ids=[
        "utf8-lone-continuation",
        "utf8-bad-pair",
        "utf8-surrogate",
        "deep-list",
        "deep-object",
        "deep-open",
    ],
)
def test_found_bugs_stay_fixed(service: Service, body: bytes) -> None:
    """Inputs that used to answer 500: now a 400 ``invalid_json`` with the one error shape."""
    status, hdrs, data = service.request("POST", "/parse", body, {"Content-Type": "application/json"})
    check_answer("regression", "POST", "/parse", status, hdrs, data, body)
    assert status == 400 and json.loads(data)["error"] == "invalid_json"


@pytest.mark.parametrize("budget", BUDGETS)
def test_random_json_bodies(service: Service, budget: str) -> None:
    run_fuzz(JSON, EXAMPLES[budget], lambda v: _post(service, "random_json", json.dumps(v).encode()))


@pytest.mark.parametrize("budget", BUDGETS)
def test_parse_bodies_mixed_scripts_and_control_chars(service: Service, budget: str) -> None:
    def body(v: dict[str, Any]) -> None:
        _post(service, "parse_fields", json.dumps(v, ensure_ascii=True).encode())  # \\ud800 stays escaped

    run_fuzz(PARSE_BODY, EXAMPLES[budget], body)


@pytest.mark.parametrize("budget", BUDGETS)
def test_raw_bytes_and_invalid_utf8(service: Service, budget: str) -> None:
    wrapped = st.builds(lambda b: b'{"text": "' + b + b'"}', st.binary(max_size=300))
    strategy = (
        st.binary(max_size=2000)
        | wrapped
        | st.sampled_from(
            [
                b"\xff\xfe",
                b'{"text": "\xc3\x28"}',
                b'{"text": "\xed\xa0\x80"}',
                b'{"text": "\xf4\x90\x80\x80"}',
                b"\xef\xbb\xbf{}",
                b'{"text": "a\x00b"}',
                b"",
                b" ",
                b"null",
                b"{",
                b'{"text": "\\ud800"}',
            ]
        )
    )
    run_fuzz(strategy, EXAMPLES[budget], lambda b: _post(service, "raw_bytes", b))


@pytest.mark.parametrize("budget", BUDGETS)
def test_deep_nesting(service: Service, budget: str) -> None:
    run_fuzz(deep_nesting(), max(10, EXAMPLES[budget] // 2), lambda b: _post(service, "deep_nesting", b))


@pytest.mark.parametrize("budget", BUDGETS)
def test_huge_strings_and_bodies(service: Service, budget: str) -> None:
    run_fuzz(huge_body(), max(10, EXAMPLES[budget] // 2), lambda b: _post(service, "huge", b))


@pytest.mark.parametrize("budget", BUDGETS)
def test_methods_paths_content_types(service: Service, budget: str) -> None:
    strategy = st.tuples(
        METHODS,
        PATHS,
        CONTENT_TYPES,
        st.none() | st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()),
    )

    def body(case: tuple[str, str, str, bytes | None]) -> None:
        method, path, ctype, payload = case
        if path == "/reindex" and method == "POST":
            path = "/nope"  # reloads are fuzzed (few) by schemathesis below
        headers = {"Content-Type": ctype} if ctype else {}
        status, hdrs, data = service.request(method, path, payload, headers)
        check_answer("method_path", method, path, status, hdrs, data, payload)

    run_fuzz(strategy, EXAMPLES[budget], body)


def test_adversarial_1000_char_texts_answer_in_time(service: Service) -> None:
    """Texts built to stress canonicalization and the rules, at the length limit, through HTTP."""
    units = [
        "выключи свет на кухне ",
        "7:30 ",
        "десять минут ",
        "{device} ",
        "пять плюс пять ",
        "а",
        "turn off the kitchen light ",
        "напомни купить хлеб через ",
        "ё\u0301",
        "😀",
        "\u200b",
    ]
    worst = 0.0
    for unit in units:
        text = (unit * (1000 // len(unit) + 1))[:1000]
        t0 = time.perf_counter()
        _post(service, "adversarial_1000", json.dumps({"text": text}).encode())
        worst = max(worst, time.perf_counter() - t0)
    print(f"\nadversarial 1000-char /parse: max {worst * 1000:.1f} ms")
    assert worst < 5.0


@pytest.mark.parametrize("budget", BUDGETS)
def test_schemathesis_from_served_openapi(service: Service, budget: str) -> None:
    """Cases generated from the service's own /openapi.json, valid and invalid, on every operation."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import (  # noqa: PLC0415
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(service.url + "/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    ops = [op.ok() for op in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in ops} >= {"POST /parse", "GET /health", "POST /reindex"}
    for op in ops:
        n = EXAMPLES[budget] if op.path != "/reindex" else max(5, EXAMPLES[budget] // 20)  # reloads cost
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            if mode is schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET":
                continue  # nothing to break: no parameters, no body

            def body(case: Any, op: Any = op) -> None:
                resp = case.call_and_validate(base_url=service.url, checks=checks, timeout=30)
                check_answer(
                    f"schemathesis_{op.path.strip('/')}",
                    op.method.upper(),
                    op.path,
                    resp.status_code,
                    {k.lower(): v[0] if isinstance(v, list) else v for k, v in resp.headers.items()},
                    resp.content,
                    resp.request.body if isinstance(resp.request.body, bytes) else None,
                )

            run_fuzz(op.as_strategy(generation_mode=mode), n, body)
    assert service.proc.poll() is None


@pytest.mark.slow
@_SKIP_UNLESS_SLOW
def test_with_token_every_protected_answer_is_json(tmp_path: Path) -> None:
    """With NLU_API_TOKEN set, wrong / missing / hostile Authorization headers get a JSON 401."""
    svc = Service(tmp_path, {"NLU_API_TOKEN": "s3cret"})
    try:
        svc.wait_healthy()

        def body(case: tuple[str, str]) -> None:
            path, auth = case
            headers = {"Content-Type": "application/json"}
            if auth:
                headers["Authorization"] = auth
            status, hdrs, data = svc.request("POST", path, b'{"text": "hi"}', headers)
            check_answer("token", "POST", path, status, hdrs, data)
            if authorize(path, "127.0.0.1", auth.strip() or None, "s3cret") is not None:
                assert status == 401, (auth, status)

        auth = st.sampled_from(
            ["", "Bearer", "Bearer ", "bearer s3cre", "Basic s3cret", "Bearer s3cret "]
        ) | st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=100)
        run_fuzz(st.tuples(st.sampled_from(["/parse", "/metrics"]), auth), 300, body)
    finally:
        assert svc.stop() == 0
