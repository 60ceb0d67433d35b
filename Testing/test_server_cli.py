"""The CLI as a thin client of a real ``oflsam2 serve`` (127.0.0.1, free port; random-weight
SAM2.1-tiny at 256 px on the CPU, small CHAOS crops): ``segment``, an update (``--previous``),
``train`` and ``batch`` with ``--server``/``--token-file`` (or their variables) write what the
same commands write locally. Four clients at once get what the same jobs give one after another;
a server killed mid-run fails every client cleanly with nothing half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk
from server_helpers import ServerProcess, chaos_crop, free_port

from oflsam2 import cli
from oflsam2.client import ServerClient
from oflsam2.remote_engine import RemoteEngine
from oflsam2.settings import LabelSupport, MethodOptions, ModelSettings

pytestmark = pytest.mark.slow
FAST = ["--random-weights", "--model", "sam2.1-tiny", "--image-size", "256", "--device", "cpu", "--deterministic"]
SETTINGS = ModelSettings(model="sam2.1-tiny", random_weights=True, device="cpu", image_size=256, deterministic=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(autouse=True)
def no_server_variables(monkeypatch):
    for name in ("OFLSAM2_SERVER", "OFLSAM2_TOKEN_FILE", "OFLSAM2_SERVER_CA"):
        monkeypatch.delenv(name, raising=False)


def write_case(folder, shared_data, number: int, slices: int = 6):
    """A CHAOS crop and its support (liver and right kidney on two planes) as NIfTI files."""
    folder.mkdir(parents=True, exist_ok=True)
    _, labels, image = chaos_crop(shared_data, number, slices=slices, size=96)
    support = np.zeros_like(labels)
    support[[1, slices - 2]] = labels[[1, slices - 2]] * np.isin(labels[[1, slices - 2]], (1, 2))
    support_image = sitk.GetImageFromArray(support)
    support_image.CopyInformation(image)
    paths = folder / f"image_{number}.nii.gz", folder / f"support_{number}.nii.gz"
    sitk.WriteImage(image, str(paths[0]))
    sitk.WriteImage(support_image, str(paths[1]))
    return paths, labels


def labels_of(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def remote(server) -> list[str]:
    return ["--server", server.url, "--token-file", str(server.token_file)]


def test_segment_an_update_and_train_through_the_server_write_what_local_runs_write(server, shared_data, tmp_path, capsys):
    (image, support), labels = write_case(tmp_path / "case", shared_data, 2)
    runs = {}
    for where, extra in (("local", []), ("server", remote(server))):
        out = tmp_path / where
        out.mkdir()
        state = out / "state"
        assert cli.main(["segment", "--image", str(image), "--support", str(support), "--out", str(out / "first.nii.gz"),
                         "--method", "ofl", "--epochs", "1", "--save-state", str(state), *FAST, *extra]) == 0
        corrected = labels_of(out / "first.nii.gz")
        corrected[3] = np.where(np.isin(labels[3], (1, 2)), labels[3], 0)  # the true outlines on plane 3
        corrected_image = sitk.GetImageFromArray(corrected.astype(np.uint8))
        corrected_image.CopyInformation(sitk.ReadImage(str(image)))
        sitk.WriteImage(corrected_image, str(out / "corrected.nii.gz"))
        assert cli.main(["segment", "--image", str(image), "--support", str(out / "corrected.nii.gz"), "--previous",
                         str(out / "first.nii.gz"), "--save-state", str(state), "--out", str(out / "updated.nii.gz"),
                         "--method", "ofl", "--epochs", "1", *FAST, *extra]) == 0
        assert cli.main(["train", "--image", str(image), "--support", str(support), "--out", str(out / "adapter"),
                         "--epochs", "1", *FAST, *extra]) == 0
        runs[where] = {name: labels_of(out / name) for name in ("first.nii.gz", "updated.nii.gz",
                                                                   "adapter/training_segmentation.nii.gz")}
        runs[where]["adapter"] = sorted(p.name for p in (out / "adapter").iterdir())
        runs[where]["state"] = sorted(p.name for p in state.iterdir())
    capsys.readouterr()
    for name in ("first.nii.gz", "updated.nii.gz", "adapter/training_segmentation.nii.gz"):
        np.testing.assert_array_equal(runs["server"][name], runs["local"][name], err_msg=name)
    assert not np.array_equal(runs["server"]["updated.nii.gz"], runs["server"]["first.nii.gz"])
    assert runs["server"]["adapter"] == runs["local"]["adapter"]
    assert {"label_1.json", "label_1.safetensors", "training_segmentation.nii.gz"} <= set(runs["server"]["adapter"])
    assert runs["server"]["state"] == runs["local"]["state"] == ["adapter", "state.json"]


def test_batch_through_the_server_with_the_variables_writes_what_a_local_batch_writes(server, shared_data, tmp_path,
                                                                                         monkeypatch, capsys):
    images, supports = tmp_path / "images", tmp_path / "supports"
    for number in (1, 3):
        (image, support), _ = write_case(tmp_path / "case", shared_data, number, slices=5)
        images.mkdir(exist_ok=True)
        supports.mkdir(exist_ok=True)
        image.rename(images / image.name)
        support.rename(supports / image.name)
    common = [str(images), "--support-dir", str(supports), "--method", "sam2", "--labels", "1", *FAST]
    assert cli.main(["batch", *common, "--out", str(tmp_path / "local")]) == 0
    monkeypatch.setenv("OFLSAM2_SERVER", server.url)
    monkeypatch.setenv("OFLSAM2_TOKEN_FILE", str(server.token_file))
    assert cli.main(["batch", *common, "--out", str(tmp_path / "server")]) == 0
    capsys.readouterr()
    for number in (1, 3):
        name = f"image_{number}_seg.nii.gz"
        np.testing.assert_array_equal(labels_of(tmp_path / "server" / name), labels_of(tmp_path / "local" / name))


def test_the_cli_says_what_is_wrong_with_a_server(server, shared_data, tmp_path, capsys):
    (image, support), _ = write_case(tmp_path / "case", shared_data, 2, slices=4)
    base = ["segment", "--image", str(image), "--support", str(support), "--method", "sam2", *FAST]
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    cases = [
        (["--out", str(tmp_path / "a.nii.gz"), "--server", server.url, "--token-file", str(wrong)], "refused the token"),
        (["--out", str(tmp_path / "b.nii.gz"), "--server", server.url], "needs the server's token"),
        (["--out", str(tmp_path / "c.nii.gz"), "--server", f"http://127.0.0.1:{free_port()}", "--token-file",
          str(server.token_file)], "Nothing answers"),
        (["--out", str(tmp_path / "d.nii.gz"), "--server", "ftp://x", "--token-file", str(server.token_file)], "https://host"),
    ]
    for extra, message in cases:
        assert cli.main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
        assert not list(tmp_path.glob("*.nii.gz"))
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"x")
    no_random = [a for a in base if a != "--random-weights"]
    assert cli.main(no_random + ["--out", str(tmp_path / "e.nii.gz"), "--checkpoint", str(checkpoint), *remote(server)]) == 2
    assert "a server cannot use" in capsys.readouterr().err


def test_four_clients_at_once_get_what_the_same_jobs_give_one_after_another(server, shared_data):
    jobs = []
    for number, method in ((1, "sam2"), (2, "ofl"), (3, "sam2"), (5, "revsam2")):
        image, labels, _ = chaos_crop(shared_data, number, slices=6, size=96)
        mask = labels == 1
        jobs.append((image, [LabelSupport(1, "liver", mask, [1, 4])], method))

    def run(job):
        image, supports, method = job
        engine = RemoteEngine(server.target(), SETTINGS)
        try:
            return engine.segment(image, supports, method=method, axis=0, options=MethodOptions(epochs=1)).masks[1]
        finally:
            engine.close()

    sequential = [run(job) for job in jobs]
    together, errors = [None] * len(jobs), []

    def client(n):
        try:
            together[n] = run(jobs[n])
        except Exception as exc:  # reported below with its client
            errors.append((n, exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not errors, errors
    for n in range(len(jobs)):
        np.testing.assert_array_equal(together[n], sequential[n], err_msg=f"client {n}")
        assert together[n].any()


def test_a_server_killed_mid_run_fails_every_client_cleanly(shared_data, tmp_path):
    server = ServerProcess(tmp_path / "server")
    clients = []
    try:
        for number in (1, 2, 3):
            (image, support), _ = write_case(tmp_path / f"case{number}", shared_data, number, slices=10)
            out = tmp_path / f"out{number}"
            out.mkdir()
            log = open(tmp_path / f"client{number}.log", "w")
            command = [sys.executable, "-m", "oflsam2.cli", "segment", "--image", str(image), "--support", str(support),
                       "--out", str(out / "result.nii.gz"), "--seg-nrrd", str(out / "result.seg.nrrd"), "--method", "ofl",
                       "--epochs", "40", *FAST, *remote(server)]
            clients.append((subprocess.Popen(command, stdout=log, stderr=log, text=True), log, out))
        deadline = time.monotonic() + 600
        while not all("training" in open(log.name).read() or "queued" in open(log.name).read() for _, log, _ in clients):
            assert time.monotonic() < deadline, "the clients' jobs did not start"
            time.sleep(0.5)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(30)
        for process, log, out in clients:
            assert process.wait(300) == 2
            log.close()
            text = open(log.name).read()
            assert "stopped answering during the run" in text and "Nothing answers" in text, text[-2000:]
            assert "Traceback" not in text
            assert list(out.iterdir()) == [], "a client left a file behind"
    finally:
        for process, log, _ in clients:
            if process.poll() is None:
                process.kill()
                process.wait(30)
            log.close()
        server.stop()


def test_a_session_the_server_lost_is_refused_with_the_reason(shared_data, tmp_path):
    """After a restart the session is gone: a job in it is refused and says why."""
    from oflsam2.client import SessionLost

    first = ServerProcess(tmp_path / "first")
    client = ServerClient(first.target())
    client.open_session()
    first.kill9()
    second = ServerProcess(tmp_path / "second", port=first.port, token_file=first.token_file)
    try:
        with pytest.raises(SessionLost, match="restarted"):
            client.upload(b"anything")
    finally:
        second.stop()
        first.stop()


def test_oflsam2_serve_refuses_plain_http_beyond_this_computer(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("a-token\n")
    token.chmod(0o600)
    assert cli.main(["serve", "--host", "0.0.0.0", "--token-file", str(token)]) == 2
    assert "unencrypted" in capsys.readouterr().err
    token.chmod(0o644)
    assert cli.main(["serve", "--token-file", str(token), "--port", "0"]) == 2
    assert "chmod 600" in capsys.readouterr().err
    assert cli.main(["serve", "--tls-cert", str(token)]) == 2
    assert "both --tls-cert and --tls-key" in capsys.readouterr().err


def test_without_a_token_file_the_server_makes_a_private_one_and_keeps_it(tmp_path, monkeypatch):
    from oflsam2.server.config import server_token

    monkeypatch.setenv("OFLSAM2_CONFIG_DIR", str(tmp_path / "config"))
    token, path, made = server_token(None)
    assert made and path == tmp_path / "config" / "server-token" and oct(path.stat().st_mode)[-3:] == "600"
    assert path.read_text().strip() == token and len(token) >= 40
    assert server_token(None) == (token, path, False)  # the clients' copy stays valid after a restart


def test_a_new_server_removes_what_a_killed_one_left(tmp_path):
    from oflsam2.server.sessions import ROOT_PREFIX
    from oflsam2.worker_state import remove_stale_state_folders

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait(60)
    left = tmp_path / f"{ROOT_PREFIX}{ended.pid}-abc"
    (left / "session-1" / "blobs").mkdir(parents=True)
    alive = tmp_path / f"{ROOT_PREFIX}{os.getpid()}-def"
    alive.mkdir()
    other = tmp_path / "not-ours"
    other.mkdir()
    remove_stale_state_folders(str(tmp_path), ROOT_PREFIX)
    assert not left.exists() and alive.exists() and other.exists()
