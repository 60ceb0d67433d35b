"""``oflsam2 serve`` against hostile and careless clients: a real server on 127.0.0.1 at a free port.

The token is checked before routing (unknown paths too) in constant time; nothing a client sends
names a path outside its session; uploads are refused by their declared size before they are
read, by their SHA-256 and by their ``.npy`` header (never unpickled); sessions never see each
other's data and close when idle; a flood of requests does not stop another client's job; TLS
works with a certificate made here (trustme), and an untrusted one is refused with what to do.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import pickle
import threading
import time

import numpy as np
import pytest
from server_helpers import InProcessServer, ServerProcess

from oflsam2.client import ServerClient, ServerError, ServerRefused, ServerUnreachable, SessionLost
from oflsam2.events import check_cancel
from oflsam2.server.config import Limits
from oflsam2.settings import SegmentResult
from oflsam2.transfer import npy_bytes, sha256_of
from oflsam2.worker import PROTOCOL_VERSION

SETTINGS = {"model": "sam2.1-tiny", "random_weights": True, "device": "cpu", "image_size": 256}


class CopyEngine:
    """Every plane: the annotated plane (a predictable stand-in); ``gate``: wait on it first."""

    def __init__(self, settings, gate: threading.Event | None = None, fail=None):
        self.gate, self.fail = gate, fail

    def segment(self, image, supports, *, method, axis, preset, options, references, events, previous=None):
        if self.fail is not None:
            raise self.fail
        while self.gate is not None and not self.gate.wait(0.02):
            check_cancel(events)
        masks = {}
        for support in supports:
            plane = np.take(support.mask, support.slices[0], axis=axis)
            masks[support.label] = np.repeat(np.expand_dims(plane, axis), image.shape[axis], axis=axis)
            for index in range(image.shape[axis]):
                check_cancel(events)
                if index not in support.slices:
                    events.slice_done(support.label, axis, index, plane)
        return SegmentResult(masks, axis, method, {"fake": True})


def request_for(client: ServerClient, shape=(4, 16, 16), **extra) -> dict:
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[1, 4:10, 4:12] = True
    return {
        "type": "segment", "settings": dict(SETTINGS), "options": {}, "method": "sam2", "axis": 0, "preset": "auto",
        "image": client.upload(npy_bytes(image)),
        "supports": [{"label": 1, "name": "organ", "slices": [1], "mask": client.upload(npy_bytes(mask))}],
        **extra,
    }


def outcome(client: ServerClient, job: int) -> list[dict]:
    return list(client.follow(job, wait=1.0))


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One request with http.client, no client logic in between: (status, parsed JSON or None)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(data) if data else None
    except ValueError:
        return response.status, None


def session_bytes(server, client) -> int:
    return server.app.state.store.get(client.session).blob_bytes()


def bearer(server) -> dict:
    return {"Authorization": f"Bearer {server.token}"}


@pytest.fixture
def fake_server(tmp_path):
    with InProcessServer(CopyEngine, state_dir=str(tmp_path)) as server:
        yield server


@pytest.fixture
def client(fake_server):
    client = ServerClient(fake_server.target())
    client.open_session()
    yield client
    client.close_session()


# ---------------------------------------------------------------------------------------------
# The token


def test_health_is_open_and_names_version_protocol_device_and_models(fake_server):
    status, health = raw(fake_server, "GET", "/v1/health")
    assert status == 200
    assert health["service"] == "oflsam2" and health["protocol"] == PROTOCOL_VERSION
    assert health["device"] == "cpu" and isinstance(health["models"], list) and health["version"]


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/sessions"), ("GET", "/v1/sessions/x/jobs/1/events"), ("PUT", "/v1/sessions/x/blobs/" + "0" * 64),
    ("DELETE", "/v1/sessions/x"), ("GET", "/v1/no-such-path"), ("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"),
    ("GET", "/v1/health/"), ("POST", "/v1/health"), ("GET", "/v1//health"), ("GET", "/v1/sessions/../health"),
])
def test_every_path_but_health_answers_401_without_the_right_token(fake_server, method, path):
    wrong_same_length = "x" * len(fake_server.token)
    for headers in ({}, {"Authorization": f"Bearer {wrong_same_length}"}, {"Authorization": "Bearer short"},
                    {"Authorization": f"bearer {fake_server.token}"}, {"Authorization": fake_server.token},
                    {"Authorization": f"Basic {fake_server.token}"}):
        status, body = raw(fake_server, method, path, body=b"{}" if method in ("POST", "PUT") else None, headers=headers)
        assert status == 401, (method, path, headers.keys())
        assert "token" in body["detail"]


def test_the_token_is_compared_in_constant_time(fake_server, monkeypatch):
    import hmac

    from oflsam2.server import auth

    compared, original = [], hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    assert raw(fake_server, "GET", "/v1/nothing", headers={"Authorization": "Bearer guess"})[0] == 401
    assert raw(fake_server, "GET", "/v1/nothing", headers=bearer(fake_server))[0] == 404  # past the check: routed
    assert compared == [(b"Bearer guess", f"Bearer {fake_server.token}".encode()),
                        (f"Bearer {fake_server.token}".encode(), f"Bearer {fake_server.token}".encode())]


def test_a_wrong_token_is_refused_by_the_client_with_what_to_do(fake_server):
    client = ServerClient(fake_server.target().__class__(fake_server.url, "not-the-token"))
    with pytest.raises(ServerRefused, match="refused the token .*--token-file"):
        client.open_session()


def test_a_protocol_mismatch_gives_one_message_naming_both_versions(fake_server, client, monkeypatch):
    status, body = raw(fake_server, "POST", "/v1/sessions", json.dumps({"protocol": 1, "version": "0.0.1"}).encode(),
                       {**bearer(fake_server), "Content-Type": "application/json"})
    assert status == 409
    assert f"protocol 1 (version 0.0.1), the server protocol {PROTOCOL_VERSION}" in body["detail"]
    monkeypatch.setattr(ServerClient, "health", lambda self: {"service": "oflsam2", "protocol": 99, "version": "9.9"})
    with pytest.raises(ServerError, match=f"protocol {PROTOCOL_VERSION} .*server protocol 99 \\(version 9.9\\)"):
        client.open_session()


# ---------------------------------------------------------------------------------------------
# Paths, uploads, pickles


def test_no_field_of_a_request_names_a_path_outside_the_session(fake_server, client, tmp_path):
    good = request_for(client)
    outside = tmp_path / "outside.npy"
    np.save(outside, np.ones((4, 16, 16), np.float32))
    hostile = ["../../../etc/passwd", str(outside), "/etc/passwd", "..", "blobs/../" + good["image"],
               good["image"].upper(), good["image"] + "/", "%2e%2e%2fetc"]

    def refused(**changes):
        request = json.loads(json.dumps(good))
        for path, value in changes.items():
            target = request
            *parents, last = path.split(".")
            for part in parents:
                target = target[int(part)] if part.isdigit() else target[part]
            target[last] = value
        with pytest.raises(ServerError) as caught:
            client.submit(request)
        return str(caught.value)

    for value in hostile:
        assert "SHA-256" in refused(image=value) or "nothing was uploaded" in refused(image=value)
        refused(**{"supports.0.mask": value})
        refused(references=[{"name": "r", "image": value, "labels": good["image"]}])
        refused(previous={"masks": {"1": value}, "axis": 0, "method": "sam2", "info": {"annotated": [1]}})
        refused(adapter_files={"Target.json": value})
    for name in ("../Target.json", "/etc/Target.json", ".hidden.json", "a/b.json", "Target.py", "..json"):
        assert "not an adapter file name" in refused(adapter_files={name: good["image"]})
    assert "checkpoint" in refused(settings={**SETTINGS, "checkpoint": str(outside)})
    assert "names a folder" in refused(options={"adapter": str(tmp_path)})
    assert "names a folder" in refused(options={"save_adapter": str(tmp_path / "out")})
    assert "Unknown request field" in refused(folder=str(tmp_path))
    session = f"/v1/sessions/{client.session}"
    for path in (f"{session}/blobs/..%2F..%2Fetc%2Fpasswd", f"{session}/jobs/1/files/..%2F..%2Fsecret.json",
                 f"{session}/jobs/1/files/%2Fetc%2Fpasswd", "/v1/sessions/..%2F..%2Ftmp/jobs", f"{session}/blobs/{'a' * 64}"):
        status, _ = raw(fake_server, "HEAD" if "/blobs/" in path else "GET", path, headers=bearer(fake_server))
        assert status in (400, 404, 422), path
    # nothing was written outside the server's folder, and the session still works
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["outside.npy", fake_server.app.state.store.root.name])
    job, _ = client.submit(good)
    assert outcome(client, job)[-1]["event"] == "done"


def test_oversized_and_malformed_uploads_are_refused_before_they_are_read(tmp_path):
    limits = Limits(max_upload_bytes=4096, max_voxels=1000, max_session_bytes=8192)
    with InProcessServer(CopyEngine, limits=limits, state_dir=str(tmp_path)) as server:
        client = ServerClient(server.target())
        client.open_session()
        blobs = f"/v1/sessions/{client.session}/blobs"
        headers = bearer(server)
        big = b"x" * 5000
        # declared too large: refused from the header alone (the body is not read)
        status, body = raw(server, "PUT", f"{blobs}/{sha256_of(big)}", big, headers)
        assert status == 413 and "at most" in body["detail"]
        # no Content-Length: refused
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.putrequest("PUT", f"{blobs}/{'0' * 64}")
        connection.putheader("Authorization", headers["Authorization"])
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        connection.send(b"5\r\nhello\r\n0\r\n\r\n")
        assert connection.getresponse().status == 411
        connection.close()
        # the bytes differ from their name
        data = npy_bytes(np.zeros(10, np.float32))
        status, body = raw(server, "PUT", f"{blobs}/{'0' * 64}", data, headers)
        assert status == 400 and "damaged" in body["detail"]
        # a name that is no SHA-256
        assert raw(server, "PUT", f"{blobs}/not-a-digest", data, headers)[0] == 400
        # a body shorter than declared (the client died): nothing is kept
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.putrequest("PUT", f"{blobs}/{sha256_of(data)}")
        connection.putheader("Authorization", headers["Authorization"])
        connection.putheader("Content-Length", str(len(data)))
        connection.endheaders()
        connection.send(data[:20])
        connection.close()
        # too many voxels, per the header
        many = npy_bytes(np.zeros(2000, np.uint8))
        status, body = raw(server, "PUT", f"{blobs}/{sha256_of(many)}", many, headers)
        assert status == 400 and "2000 voxels" in body["detail"]
        # a header that lies about the data's length
        short = npy_bytes(np.zeros(100, np.float32))[:-40]
        status, body = raw(server, "PUT", f"{blobs}/{sha256_of(short)}", short, headers)
        assert status == 400 and "its header" in body["detail"]
        # a damaged header
        broken = b"\x93NUMPY\x01\x00\x20\x00{'descr': '<f4', 'fortran_ord\n"
        assert raw(server, "PUT", f"{blobs}/{sha256_of(broken)}", broken, headers)[0] == 400
        # not an array at all, used as one: refused when the job is submitted
        junk = b"just some bytes"
        client.upload(junk)
        with pytest.raises(ServerError, match="not a .npy array"):
            client.submit({**request_for(client, shape=(2, 4, 4)), "image": sha256_of(junk)})
        # the session's quota
        with pytest.raises(ServerError, match="per session"):  # 1.7 kB each, 8 kB per session
            for seed in range(6):
                client.upload(npy_bytes(np.random.default_rng(seed).random(400).astype(np.float32)))
        assert session_bytes(server, client) <= limits.max_session_bytes
        time.sleep(0.2)
        session = server.app.state.store.get(client.session)
        assert not [p.name for p in session.blobs.iterdir() if p.name.startswith(".upload-")]
        assert sha256_of(data) not in os.listdir(session.blobs)
        client.close_session()


class _Boom:
    """A pickle that would create a file when loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_npy_is_refused_and_never_unpickled(fake_server, client, tmp_path):
    witness = tmp_path / "unpickled"
    out = io.BytesIO()
    np.save(out, np.array([_Boom(str(witness))], dtype=object), allow_pickle=True)
    pickled = out.getvalue()
    with pytest.raises(ServerError, match="need pickle"):
        client.upload(pickled)
    # also as a plain pickle file uploaded as a non-array and then named as one
    plain = pickle.dumps(_Boom(str(witness)))
    client.upload(plain)
    with pytest.raises(ServerError, match="not a .npy array"):
        client.submit({**request_for(client), "image": sha256_of(plain)})
    assert not witness.exists()


# ---------------------------------------------------------------------------------------------
# Sessions


def test_sessions_never_see_each_others_data(fake_server):
    alice, bob = ServerClient(fake_server.target()), ServerClient(fake_server.target())
    alice.open_session()
    bob.open_session()
    request = request_for(alice)
    job, _ = alice.submit(request)
    assert outcome(alice, job)[-1]["event"] == "done"
    with pytest.raises(ServerError, match="nothing was uploaded"):  # Alice's volume is not Bob's
        bob.submit({**request, "supports": request["supports"]})
    assert bob._call("HEAD", f"/v1/sessions/{bob.session}/blobs/{request['image']}", expect=(200, 404)) == 404
    with pytest.raises(ServerError, match="no job"):  # nor her job's events
        bob.events(job, 0, 0)
    bob_request = request_for(bob)
    bob_request["previous_job"] = job  # nor the result an Update of hers starts from
    refused = outcome(bob, bob.submit(bob_request)[0])[-1]
    assert refused["event"] == "error" and "no longer holds the result" in refused["message"]
    folders = [alice_folder, bob_folder] = [fake_server.app.state.store.get(c.session).folder for c in (alice, bob)]
    assert alice_folder != bob_folder and all(oct(f.stat().st_mode)[-3:] == "700" for f in folders)
    alice.close_session()
    assert not alice_folder.exists()
    bob.close_session()


def test_an_idle_session_expires_and_its_data_is_removed(tmp_path):
    with InProcessServer(CopyEngine, limits=Limits(session_idle_seconds=1), state_dir=str(tmp_path)) as server:
        client = ServerClient(server.target())
        client.open_session()
        digest = client.upload(npy_bytes(np.zeros(8, np.float32)))
        folder = server.app.state.store.get(client.session).folder
        deadline = time.monotonic() + 30
        while folder.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not folder.exists()
        with pytest.raises(SessionLost, match="no such session"):
            client.upload(npy_bytes(np.ones(8, np.float32)))
        assert digest


def test_the_session_limit_is_a_clear_refusal(tmp_path):
    with InProcessServer(CopyEngine, limits=Limits(max_sessions=2), state_dir=str(tmp_path)) as server:
        clients = [ServerClient(server.target()) for _ in range(3)]
        clients[0].open_session()
        clients[1].open_session()
        with pytest.raises(ServerError, match="maximum of 2 sessions"):
            clients[2].open_session()
        clients[0].close_session()
        clients[2].open_session()  # a closed session frees its place


# ---------------------------------------------------------------------------------------------
# Jobs: queue, cancel, out of memory


def test_queued_jobs_learn_their_position_and_a_cancel_ends_them(tmp_path):
    gate = threading.Event()
    with InProcessServer(lambda s: CopyEngine(s, gate), limits=Limits(max_queued_jobs=2), state_dir=str(tmp_path)) as server:
        clients = [ServerClient(server.target()) for _ in range(4)]
        for client in clients:
            client.open_session()
        first, _ = clients[0].submit(request_for(clients[0]))
        deadline = time.monotonic() + 10
        while server.app.state.queue._running is None and time.monotonic() < deadline:
            time.sleep(0.01)
        second, ahead_second = clients[1].submit(request_for(clients[1]))
        third, ahead_third = clients[2].submit(request_for(clients[2]))
        assert (ahead_second, ahead_third) == (1, 2)
        with pytest.raises(ServerError, match="queue is full"):
            clients[3].submit(request_for(clients[3]))
        clients[1].cancel(second)
        assert outcome(clients[1], second)[-1]["event"] == "cancelled"
        moved = [e for e in clients[2].events(third, 0, 0) if e["event"] == "queued"]
        assert [e["position"] for e in moved][-1] == 1  # the cancelled job no longer counts
        gate.set()
        assert outcome(clients[0], first)[-1]["event"] == "done"
        assert outcome(clients[2], third)[-1]["event"] == "done"


def test_an_out_of_memory_error_fails_only_that_job(tmp_path):
    import torch

    def engine(settings):
        if settings.image_size == 512:  # this client's job runs out of GPU memory
            return CopyEngine(settings, fail=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        return CopyEngine(settings)

    with InProcessServer(engine, state_dir=str(tmp_path)) as server:
        greedy, modest = ServerClient(server.target()), ServerClient(server.target())
        greedy.open_session()
        modest.open_session()
        failing = request_for(greedy)
        failing["settings"]["image_size"] = 512
        failed_job, _ = greedy.submit(failing)
        fine_job, _ = modest.submit(request_for(modest))
        failed = outcome(greedy, failed_job)[-1]
        assert failed["event"] == "error" and failed["out_of_memory"] is True and failed["traceback"] == ""
        assert outcome(modest, fine_job)[-1]["event"] == "done"
        again, _ = greedy.submit(request_for(greedy))  # the failing session goes on, too
        assert outcome(greedy, again)[-1]["event"] == "done"


# ---------------------------------------------------------------------------------------------
# A flood, and TLS


@pytest.mark.slow
def test_a_request_flood_does_not_stop_another_clients_job(tmp_path, shared_data):
    """300 requests from 6 threads (bad tokens, junk uploads, unknown sessions, health, sessions
    opened and closed) while another client's real segmentation runs: it completes with the same
    result as the same job run on the quiet server afterwards, and no request gets a 5xx."""
    from server_helpers import chaos_crop

    image, labels, _ = chaos_crop(shared_data, 2, slices=5, size=64)
    with ServerProcess(tmp_path / "server", "--max-sessions", "8") as server:
        client = ServerClient(server.target())
        client.open_session()
        mask = labels == 1
        request = {"type": "segment", "settings": dict(SETTINGS, deterministic=True), "options": {}, "method": "sam2",
                   "axis": 0, "preset": "auto", "image": client.upload(npy_bytes(image)),
                   "supports": [{"label": 1, "name": "liver", "slices": [2], "mask": client.upload(npy_bytes(mask))}]}
        statuses, lock = [], threading.Lock()

        def flood(worker: int):
            junk = os.urandom(2048)
            for number in range(50):
                kind = number % 5
                if kind == 0:
                    status = raw(server, "POST", "/v1/sessions", b"{}", {"Authorization": f"Bearer wrong{number}"})[0]
                elif kind == 1:
                    status = raw(server, "GET", "/v1/health")[0]
                elif kind == 2:
                    status = raw(server, "PUT", f"/v1/sessions/nope{worker}/blobs/{sha256_of(junk)}", junk, bearer(server))[0]
                elif kind == 3:
                    status = raw(server, "GET", f"/v1/sessions/{client.session}/jobs/999/events?wait=0", None, bearer(server))[0]
                else:
                    other = ServerClient(server.target())
                    try:
                        other.open_session()
                        other.upload(junk)
                        status = 201
                    except ServerError:
                        status = 429  # the session limit, refused cleanly
                    finally:
                        other.close_session()
                with lock:
                    statuses.append(status)

        job, _ = client.submit(request)
        threads = [threading.Thread(target=flood, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        events = outcome(client, job)
        for thread in threads:
            thread.join(300)
        assert len(statuses) == 300 and all(status < 500 for status in statuses), sorted(set(statuses))
        assert events[-1]["event"] == "done", events[-1]
        during = {e["index"]: e["plane"]["bits"] for e in events if e["event"] == "slice"}
        quiet = outcome(client, client.submit(request)[0])
        assert {e["index"]: e["plane"]["bits"] for e in quiet if e["event"] == "slice"} == during
        assert sorted(during) == [0, 1, 3, 4]
        client.close_session()


def test_tls_with_a_certificate_made_here_and_an_untrusted_one_refused(tmp_path):
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert, key, ca = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    certificate.cert_chain_pems[0].write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    authority.cert_pem.write_to_path(str(ca))
    with InProcessServer(CopyEngine, tls=(str(cert), str(key)), state_dir=str(tmp_path)) as server:
        trusted = ServerClient(server.target(ca_file=str(ca)))
        trusted.open_session()
        job, _ = trusted.submit(request_for(trusted))
        assert outcome(trusted, job)[-1]["event"] == "done"
        trusted.close_session()
        with pytest.raises(ServerUnreachable, match="not trusted .*--server-ca"):
            ServerClient(server.target()).open_session()  # the system's authorities do not know ours
        plain = ServerClient(server.target().__class__(server.url.replace("https", "http"), server.token))
        with pytest.raises(ServerUnreachable, match="https://"):
            plain.open_session()


def test_one_model_per_device_is_shared_by_every_session():
    from oflsam2.server.models import ModelPool
    from oflsam2.settings import ModelSettings

    loaded, evicted = [], []

    def loader(settings):
        loaded.append(settings.model)
        return object()

    pool = ModelPool(2, on_evict=lambda: evicted.append(True), loader=loader)
    tiny = ModelSettings(**SETTINGS)
    first, second = pool.engine_factory(tiny), pool.engine_factory(ModelSettings(**SETTINGS, cache_megabytes=64))
    assert first is not second and first._caches is not second._caches  # each session its own encoded slices
    assert first.model is second.model and loaded == ["sam2.1-tiny"]  # one model for both
    pool.model(ModelSettings(**{**SETTINGS, "image_size": 512}))
    assert loaded == ["sam2.1-tiny"] * 2 and not evicted
    pool.model(ModelSettings(**{**SETTINGS, "model": "sam2.1-small"}))  # a third: the least recent one goes
    assert evicted == [True] and pool.loaded == ["sam2.1-tiny @ 512 px", "sam2.1-small @ 256 px"]
