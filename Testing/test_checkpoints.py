"""Checkpoint manager: manifest, cache folder, verified resumable downloads (from a local HTTP
server, never the internet), structural checks of checkpoint files and SAM2 version detection."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

import pytest
import torch

from oflsam2 import checkpoints
from oflsam2.checkpoints import (
    cache_dir,
    checkpoint_version,
    download,
    load_manifest,
    read_state_dict,
    resolve_checkpoint,
    sha256_file,
    verify,
)
from oflsam2.errors import Cancelled, CheckpointError, InputError
from oflsam2.events import CancelToken

EXPECTED_MODELS = {
    "sam2.1-tiny", "sam2.1-small", "sam2.1-base-plus", "sam2.1-large",
    "sam2-tiny", "sam2-small", "sam2-base-plus", "sam2-large", "medsam2",
}


def sam2_like_bytes(version: str = "2.1", pad_floats: int = 700_000) -> bytes:
    """A small torch checkpoint shaped like SAM2's (``{"model": {name: tensor}}``), ~2.8 MB."""
    weights = {
        "image_encoder.trunk.pos_embed": torch.arange(pad_floats, dtype=torch.float32),
        "sam_mask_decoder.iou_token.weight": torch.ones(1, 256),
    }
    if version == "2.1":
        weights["no_obj_embed_spatial"] = torch.zeros(1, 64)
        weights["obj_ptr_tpos_proj.weight"] = torch.zeros(256, 256)
    buffer = io.BytesIO()
    torch.save({"model": weights}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def payload() -> bytes:
    return sam2_like_bytes()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("OFLSAM2_CACHE_DIR", str(folder))
    monkeypatch.delenv("OFLSAM2_CHECKPOINT", raising=False)
    monkeypatch.delenv("OFLSAM2_DOWNLOAD_BASE", raising=False)
    return folder


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.payload`` at any path; honours ``Range: bytes=N-`` unless told not to."""

    def do_GET(self):
        server = self.server
        body = server.payload
        requested = self.headers.get("Range")
        server.requests.append((self.path, requested))
        start = 0
        if requested and server.honour_range:
            start = int(requested.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])
        server.sent += len(body) - start

    def log_message(self, *args):
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that stops reading (cancel test) is expected here


@pytest.fixture
def server(payload):
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    httpd.payload, httpd.honour_range, httpd.requests, httpd.sent = payload, True, [], 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/MedSAM2_latest.pt"


# --------------------------------------------------------------------------------------------
# Manifest and cache folder


def test_manifest_entries_are_complete_and_point_at_installed_configs():
    raw = (resources.files("oflsam2") / "models.json").read_text(encoding="utf-8")

    def refuse_duplicates(pairs):
        keys = [key for key, _ in pairs]
        assert len(keys) == len(set(keys)), f"duplicate keys {keys}"
        return dict(pairs)

    models = json.loads(raw, object_pairs_hook=refuse_duplicates)["models"]
    assert set(models) == EXPECTED_MODELS == set(load_manifest())
    filenames = [entry["filename"] for entry in models.values()]
    assert len(filenames) == len(set(filenames))
    sam2_package = resources.files("sam2")
    for name, entry in models.items():
        assert (sam2_package / entry["config"]).is_file(), (name, entry["config"])
        assert entry["version"] in ("2.1", "1")
        assert ("/sam2.1/" in entry["config"]) == (entry["version"] == "2.1"), name
        assert entry["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]), name
        assert entry["size_bytes"] is None or entry["size_bytes"] > 50_000_000, name
        assert entry["url"].startswith("https://") and entry["url"].endswith("/" + entry["filename"]), name
        assert entry["image_size"] % 32 == 0 and entry["image_size"] >= 256
        assert entry["description"] and entry["_source"] and entry["license"]
    assert models["sam2.1-tiny"]["sha256"] == "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69"
    assert len({entry["sha256"] for entry in models.values() if entry["sha256"]}) == 8


def test_cache_dir_follows_the_environment_and_stays_out_of_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("OFLSAM2_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("OFLSAM2_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = cache_dir()
    assert default.parts[-2:] == ("oflsam2", "checkpoints")
    assert checkpoints.MANIFEST_PATH.parent not in default.parents
    if default.is_relative_to(tmp_path):  # Linux honours XDG_CACHE_HOME
        assert default == tmp_path / "xdg" / "oflsam2" / "checkpoints"


def test_unknown_model_names_the_choices(cache):
    with pytest.raises(InputError, match="sam2.1-tiny"):
        resolve_checkpoint("sam3-huge")


# --------------------------------------------------------------------------------------------
# Downloads


def test_download_streams_with_progress_into_the_cache(cache, server, payload):
    seen = []
    path = download("medsam2", progress=lambda done, total: seen.append((done, total)), url=server.url + "/f.pt")
    assert path == cache / "MedSAM2_latest.pt"
    assert path.read_bytes() == payload
    assert not (cache / "MedSAM2_latest.pt.part").exists()
    assert seen[-1] == (len(payload), len(payload))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen) and len(seen) > 2
    assert server.requests == [("/f.pt", None)]
    # Already there and valid: no second request.
    assert download("medsam2", url=server.url + "/f.pt") == path
    assert len(server.requests) == 1


def test_download_resumes_a_partial_file_with_a_range_request(cache, server, payload):
    cache.mkdir(parents=True)
    kept = len(payload) // 3
    (cache / "MedSAM2_latest.pt.part").write_bytes(payload[:kept])
    path = download("medsam2", url=server.url + "/f.pt")
    assert server.requests == [("/f.pt", f"bytes={kept}-")]
    assert server.sent == len(payload) - kept
    assert path.read_bytes() == payload


def test_download_restarts_cleanly_when_the_server_ignores_range(cache, server, payload):
    cache.mkdir(parents=True)
    (cache / "MedSAM2_latest.pt.part").write_bytes(b"junk that must not stay in front" * 100)
    server.honour_range = False
    path = download("medsam2", url=server.url + "/f.pt")
    assert path.read_bytes() == payload
    assert server.sent == len(payload)


def test_download_restarts_when_the_partial_file_is_longer_than_the_file(cache, server, payload):
    cache.mkdir(parents=True)
    (cache / "MedSAM2_latest.pt.part").write_bytes(payload + b"extra")
    assert download("medsam2", url=server.url + "/f.pt").read_bytes() == payload
    assert [requested for _, requested in server.requests] == [f"bytes={len(payload) + 5}-", None]


def test_download_uses_the_mirror_from_the_environment(cache, server, payload, monkeypatch):
    monkeypatch.setenv("OFLSAM2_DOWNLOAD_BASE", server.url + "/mirror/")
    assert download("medsam2").read_bytes() == payload
    assert server.requests == [("/mirror/MedSAM2_latest.pt", None)]


def test_a_wrong_hash_deletes_the_partial_file_and_raises(cache, server):
    with pytest.raises(CheckpointError, match="SHA256") as error:
        download("sam2.1-tiny", url=server.url + "/sam2.1_hiera_tiny.pt")
    assert "deleted" in str(error.value)
    assert list(cache.iterdir()) == []


def test_a_file_without_hash_that_is_not_sam2_is_deleted(cache, server):
    server.payload = b"<html>a login page, not a checkpoint</html>" * 50
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        download("medsam2", url=server.url + "/f.pt")
    assert list(cache.iterdir()) == []


def test_cancelling_keeps_the_partial_file_for_the_next_attempt(cache, server, payload):
    token = CancelToken()

    def cancel_after_first_chunk(done, total):
        if done > 0:
            token.cancel()

    with pytest.raises(Cancelled, match="partial file"):
        download("medsam2", progress=cancel_after_first_chunk, cancel=token, url=server.url + "/f.pt")
    kept = (cache / "MedSAM2_latest.pt.part").stat().st_size
    assert 0 < kept < len(payload)
    assert not (cache / "MedSAM2_latest.pt").exists()
    assert download("medsam2", url=server.url + "/f.pt").read_bytes() == payload
    assert server.requests[-1][1] == f"bytes={kept}-"


def test_unreachable_server_fails_fast_with_the_manual_route(cache):
    started = time.perf_counter()
    with pytest.raises(CheckpointError) as error:
        download("medsam2", url=closed_port_url(), timeout=3)
    assert time.perf_counter() - started < 5
    message = str(error.value)
    for expected in ("MedSAM2_latest.pt", load_manifest()["medsam2"]["url"], str(cache), "--checkpoint"):
        assert expected in message


# --------------------------------------------------------------------------------------------
# Hashes and resolution


def test_sha256_and_verify(tmp_path, payload):
    path = tmp_path / "w.pt"
    path.write_bytes(payload)
    expected = hashlib.sha256(payload).hexdigest()
    seen = []
    assert sha256_file(path, progress=lambda done, total: seen.append(done)) == expected
    assert seen[-1] == len(payload)
    assert verify(path, expected) == expected
    assert verify(path, expected.upper()) == expected
    assert verify(path, None) == expected
    with pytest.raises(CheckpointError, match="damaged"):
        verify(path, "0" * 64)
    with pytest.raises(CheckpointError, match="does not exist"):
        verify(tmp_path / "absent.pt", expected)


def test_missing_checkpoint_message_says_how_to_get_it(cache):
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint("sam2.1-tiny")
    message = str(error.value)
    entry = load_manifest()["sam2.1-tiny"]
    for expected in (entry["filename"], entry["url"], str(cache), "oflsam2 checkpoints download sam2.1-tiny"):
        assert expected in message


def test_resolution_order_explicit_then_environment_then_cache(cache, tmp_path, monkeypatch, payload):
    cache.mkdir(parents=True)
    (cache / "MedSAM2_latest.pt").write_bytes(payload)
    assert resolve_checkpoint("medsam2") == cache / "MedSAM2_latest.pt"
    from_env = tmp_path / "env.pt"
    from_env.write_bytes(payload)
    monkeypatch.setenv("OFLSAM2_CHECKPOINT", str(from_env))
    assert resolve_checkpoint("medsam2") == from_env
    explicit = tmp_path / "mine.pt"
    explicit.write_bytes(payload)
    assert resolve_checkpoint("medsam2", explicit) == explicit
    with pytest.raises(CheckpointError, match="absent.pt"):
        resolve_checkpoint("medsam2", tmp_path / "absent.pt")
    monkeypatch.setenv("OFLSAM2_CHECKPOINT", str(tmp_path / "gone.pt"))
    with pytest.raises(CheckpointError, match="OFLSAM2_CHECKPOINT"):
        resolve_checkpoint("medsam2")


def test_a_damaged_cached_file_is_refused(cache, payload):
    cache.mkdir(parents=True)
    (cache / "sam2.1_hiera_tiny.pt").write_bytes(payload)
    with pytest.raises(CheckpointError, match="damaged.*checkpoints download sam2.1-tiny"):
        resolve_checkpoint("sam2.1-tiny")


def test_a_users_own_file_with_another_hash_is_accepted(cache, tmp_path, payload):
    own = tmp_path / "sam2.1_hiera_tiny.pt"
    own.write_bytes(payload)
    assert resolve_checkpoint("sam2.1-tiny", own) == own


# --------------------------------------------------------------------------------------------
# Structural checks and SAM2 version


def test_read_state_dict_returns_the_model_weights(tmp_path, payload):
    path = tmp_path / "ok.pt"
    path.write_bytes(payload)
    weights = read_state_dict(path)
    assert weights["sam_mask_decoder.iou_token.weight"].shape == (1, 256)


def test_read_state_dict_refuses_a_truncated_file(tmp_path, payload):
    path = tmp_path / "cut.pt"
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(CheckpointError, match="truncated.*checkpoints download"):
        read_state_dict(path)


def test_read_state_dict_refuses_a_torch_file_without_model(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"layer.weight": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="not a SAM2 checkpoint.*state_dict"):
        read_state_dict(path)


def test_read_state_dict_refuses_weights_of_another_network(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"model": {"conv1.weight": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="not SAM2's"):
        read_state_dict(path)


def test_read_state_dict_refuses_nan_weights(tmp_path):
    """Weights with the right names but NaN (or infinite) values ran to rc 0 with every slice
    empty and no warning."""
    for bad in (float("nan"), float("inf")):
        weights = torch.load(io.BytesIO(sam2_like_bytes(pad_floats=1000)), weights_only=True)["model"]
        weights["sam_mask_decoder.iou_token.weight"][0, 3] = bad
        path = tmp_path / "diverged.pt"
        torch.save({"model": weights}, path)
        with pytest.raises(CheckpointError, match=r"1 weight tensor\(s\) with NaN or infinite values .*iou_token"):
            read_state_dict(path, "sam2.1-tiny")


def test_read_state_dict_refuses_a_non_torch_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n" * 20)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pt")


def test_version_detection_on_synthetic_state_dicts():
    assert checkpoint_version({"no_obj_embed_spatial": 0, "image_encoder.x": 0}) == "2.1"
    assert checkpoint_version({"obj_ptr_tpos_proj.weight": 0, "obj_ptr_tpos_proj.bias": 0}) == "2.1"
    assert checkpoint_version({"image_encoder.x": 0, "obj_ptr_proj.layers.0.weight": 0}) == "1"


@pytest.mark.parametrize("name", ["sam2.1-tiny", "sam2-tiny"])
def test_version_detection_on_the_real_architectures(name):
    """The keys sam2's own configs produce are told apart as the manifest says."""
    import sam2  # noqa: F401  (registers sam2's configs with Hydra)
    from hydra import compose
    from hydra.utils import instantiate

    entry = load_manifest()[name]
    net = instantiate(compose(config_name=entry["config"]).model, _recursive_=True)
    assert checkpoint_version(net.state_dict()) == entry["version"]
