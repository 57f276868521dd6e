"""Bad input, faults and security against a real TorchServe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

import demo_models
import reference
import tsctl
from client import KeyRing, RestClient
from corpus import Case, build_cases
from kit import MODEL_STORE, MODELS, REPO, SOURCE_PATH, Server
from soak import default_payloads, run_soak
from tsctl import Keys, TorchServe, derive_config, random_endpoints

pytestmark = pytest.mark.e2e
CASES = build_cases()


def send(server: Server, model: str, case: Case) -> requests.Response:
    """Send a corpus case over REST the way a client would."""
    url = f"{server.endpoints.url('inference')}/predictions/{model}"
    headers = {"Authorization": f"Bearer {server.keys.inference}"}
    if case.field:
        return requests.post(url, files={case.field: ("upload", case.body)}, headers=headers, timeout=120)
    return requests.post(url, data=case.body, headers={**headers, "Content-Type": case.content_type}, timeout=120)


def worker_pids(server: Server, model: str) -> list[int]:
    return tsctl.worker_pids(server.endpoints, server.keys, model)


@pytest.mark.parametrize("model", MODELS)
def test_corpus_against_torchserve(server: Server, model: str, jpegs: dict[str, bytes]) -> None:
    pids = worker_pids(server, model)
    for case in CASES:
        reply = send(server, model, case)
        assert reply.status_code == case.status, (case.name, reply.text[:300])
        body = reply.json()
        if case.status != 200:
            assert body["code"] == case.status and case.text in body["error"], (case.name, body)
    assert worker_pids(server, model) == pids, "a worker restarted during the corpus"
    good = requests.post(
        f"{server.endpoints.url('inference')}/predictions/{model}",
        data=jpegs["chelsea"],
        headers={"Authorization": f"Bearer {server.keys.inference}"},
        timeout=60,
    )
    assert good.status_code == 200


def test_every_corpus_case_among_seven_good_images(server: Server, digits_test: tuple[list[bytes], list[int]]) -> None:
    """batchSize 8: each case sent with 7 good digits, concurrently, 3 times; good ones always right."""
    rest = RestClient(server.endpoints, KeyRing(server.key_file))
    images = digits_test[0][30:37]
    expected = [reference.class_probabilities("digits", np.asarray(_decode(b))) for b in images]
    pids = worker_pids(server, "digits")
    errors: list[str] = []
    for case in (c for c in CASES if c.status != 200):
        for _round in range(3):
            with ThreadPoolExecutor(8) as pool:
                bad = pool.submit(send, server, "digits", case)
                goods = list(pool.map(lambda b: rest.predict("digits", b), images))
            if bad.result().status_code != case.status:
                errors.append(f"{case.name}: {bad.result().status_code}")
            for reply, probs in zip(goods, expected):
                assert reply.status == 200, (case.name, reply.body)
                reference.assert_classification_matches(reply.body, probs)
    assert not errors
    assert worker_pids(server, "digits") == pids


def test_kill_9_a_worker_under_load(
    server: Server, capsys: pytest.CaptureFixture[str], jpegs: dict[str, bytes]
) -> None:
    model, timeout = "resnet18", 60  # resnet18's responseTimeout
    rest = RestClient(server.endpoints, KeyRing(server.key_file), timeout=timeout + 30)
    (pid,) = worker_pids(server, model)
    statuses: Counter = Counter()
    slowest = [0.0]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                statuses[rest.predict(model, jpegs["coffee"]).status] += 1
            except requests.RequestException as exc:
                statuses[type(exc).__name__] += 1
            slowest[0] = max(slowest[0], time.monotonic() - start)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while True:
        pids = worker_pids(server, model)
        if pids and pids != [pid]:
            break
        assert time.monotonic() - killed_at < 120, "no new worker within 120 s"
        time.sleep(0.2)
    recovery = time.monotonic() - killed_at
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join(timeout=timeout + 60)
    assert not any(t.is_alive() for t in threads), "a request hung past the response timeout"
    assert slowest[0] < timeout + 30
    after = [rest.predict(model, jpegs["coffee"]) for _ in range(5)]
    assert all(r.status == 200 for r in after)
    with capsys.disabled():
        sys.stderr.write(
            f"\n[kill -9] worker {pid} replaced by {pids} in {recovery:.1f} s; statuses during load: {dict(statuses)}; "
            f"slowest request {slowest[0]:.1f} s\n"
        )


@pytest.fixture(scope="module")
def short_keys_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    """digits only; keys expire after 6 s; the model API on (to show allowed_urls still holds)."""
    workdir = tmp_path_factory.mktemp("ts_short_keys")
    overrides = {**random_endpoints().properties(), "token_expiration_min": "0.1", "enable_model_api": "true"}
    config = derive_config(REPO / "config.properties", workdir / "config.properties", overrides)
    process = TorchServe(workdir, config, MODEL_STORE, ["digits=digits.mar"])
    process.start()
    try:
        process.wait_ready(["digits"], timeout=300)
        yield process
    finally:
        process.stop()
    assert process.processes() == []


def test_keys_expire_and_the_client_follows_renewed_keys(short_keys_server: TorchServe) -> None:
    key_file = short_keys_server.workdir / "key_file.json"
    png = demo_models.encode(demo_models.digit_images("test")[0][0], "PNG")
    client = RestClient(short_keys_server.endpoints, KeyRing(key_file))
    old = Keys.read(key_file)
    time.sleep(7)
    expired = requests.post(
        f"{short_keys_server.endpoints.url('inference')}/predictions/digits",
        data=png,
        headers={"Authorization": f"Bearer {old.inference}"},
        timeout=30,
    )
    assert expired.status_code == 400 and expired.json()["type"] == "InvalidKeyException"
    new = short_keys_server.renew("inference")
    assert new.inference != old.inference
    assert client.keys.inference == old.inference
    reply = client.predict("digits", png)  # refused once, re-reads key_file.json, succeeds
    assert reply.status == 200 and client.keys.inference == new.inference


def test_allowed_urls_refuse_remote_and_foreign_archives(short_keys_server: TorchServe) -> None:
    keys = short_keys_server.renew("management")
    url = f"{short_keys_server.endpoints.url('management')}/models"
    headers = {"Authorization": f"Bearer {keys.management}"}
    for source in (
        "https://example.com/resnet.mar",
        "http://127.0.0.1:1/x.mar",
        "file:///etc/passwd",
        "/tmp/other/x.mar",
    ):
        reply = requests.post(url, params={"url": source}, headers=headers, timeout=30)
        assert 400 <= reply.status_code < 500, (source, reply.text)
        assert "allowed" in reply.text.lower() or "not found" in reply.text.lower(), (source, reply.text)
    assert [m["modelName"] for m in requests.get(url, headers=headers, timeout=10).json()["models"]] == ["digits"]


def test_a_pt_with_pickled_code_is_refused_at_load(tmp_path: Path) -> None:
    """A real archive whose model.pt carries code: TorchServe's loader fails it clearly; nothing runs."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "models" / "evil"
    folder.mkdir(parents=True)
    for name in ("model-config.yaml", "model.py", "labels.json"):
        (folder / name).write_bytes((REPO / "models" / "digits" / name).read_bytes())
    (folder / "model.pt").write_bytes(_pickled_code(marker))
    env = {**os.environ, "PYTHONPATH": SOURCE_PATH}
    args = subprocess.run(
        [sys.executable, str(REPO / "scripts/packaging/archive_args.py"), "evil", "--models", str(tmp_path / "models"),
         "--stage", str(tmp_path / "stage"), "--export", str(tmp_path), "--handlers", str(REPO / "handlers")],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.split()  # fmt: skip
    archiver = str(Path(sys.executable).parent / "torch-model-archiver")
    subprocess.run([archiver, *args], check=True, cwd=REPO, env={**env, "TMPDIR": str(tmp_path)})
    extracted = tmp_path / "extracted"
    with zipfile.ZipFile(tmp_path / "evil.mar") as mar:
        mar.extractall(extracted)
    from ts.model_loader import TsModelLoader

    from servekit.errors import ConfigError

    with pytest.raises(ConfigError, match="refused to load model.pt: it is a checkpoint whose metadata holds posix"):
        TsModelLoader().load("evil", str(extracted), "servekit_classifier.py", None, 8)
    assert not marker.exists()


def test_soak_one_minute(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    report = run_soak(server.endpoints, server.keys, default_payloads(), MODELS, seconds=45, concurrency=6, warmup=15)
    with capsys.disabled():
        sys.stderr.write("\n[soak] " + "\n[soak] ".join(report.lines()) + "\n")
    assert not report.unexpected, report.unexpected
    assert report.served > 50
    assert all(g < 0.10 for g in report.growth().values()), report.growth()


def _pickled_code(marker: Path) -> bytes:
    import io

    import torch

    class RunsCode:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(1), "payload": RunsCode()}, buffer)
    return buffer.getvalue()


def _decode(data: bytes) -> Any:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")
