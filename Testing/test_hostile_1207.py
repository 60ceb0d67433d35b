"""Hostile pass of 12-07: ``oflsam2 serve``'s flags, the server's URL as a client is given it,
and OFL-SAM2 adapters used under the other preset.

Each test names the input, what must happen and what must stay as it was. Servers listen on
127.0.0.1 at a free port and are stopped by the test; the adapter cases train a real adapter
with random-weight SAM2.1-tiny (the ``cohort`` fixture) on real CHAOS crops.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from server_helpers import REPO, InProcessServer, write_token

from oflsam2 import cli, pipeline
from oflsam2.api import Engine, LabelSupport, MethodOptions
from oflsam2.batch import BatchJob, check_job
from oflsam2.client import ServerClient, ServerError, ServerRefused, ServerTarget
from oflsam2.errors import AdapterError


@pytest.fixture
def token_file(tmp_path) -> Path:
    return write_token(tmp_path)[1]


# -- oflsam2 serve's flags --------------------------------------------------------------------


def test_a_port_beyond_65535_is_refused_not_served_on_another_port(token_file, tmp_path):
    """Before: ``--port 70000`` listened on 4464 (70000 - 65536) and printed that address."""
    result = subprocess.run(
        [sys.executable, "-m", "oflsam2.cli", "serve", "--port", "70000", "--token-file", str(token_file), "--device", "cpu",
         "--stop-with-stdin"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, cwd=REPO,
        env=dict(os.environ, OFLSAM2_CONFIG_DIR=str(tmp_path / "config")),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--port must be from 0 to 65535" in result.stderr and "Traceback" not in result.stderr
    assert "listening" not in result.stdout


@pytest.mark.parametrize("minutes", ["nan", "inf"])
def test_a_session_lifetime_that_is_not_a_number_is_refused(minutes, token_file, capsys):
    """Before: ``--session-idle-minutes nan`` was a raw ValueError traceback (inf: OverflowError)."""
    assert cli.main(["serve", "--port", "0", "--token-file", str(token_file), "--session-idle-minutes", minutes]) == 2
    assert "--session-idle-minutes must be above 0" in capsys.readouterr().err


def _tls_files(folder: Path):
    import trustme
    from cryptography.hazmat.primitives import serialization

    authority = trustme.CA()
    issued, other = authority.issue_cert("127.0.0.1"), authority.issue_cert("127.0.0.1")
    files = {name: folder / f"{name}.pem" for name in ("cert", "key", "other-key", "garbage", "encrypted-key")}
    issued.cert_chain_pems[0].write_to_path(str(files["cert"]))
    issued.private_key_pem.write_to_path(str(files["key"]))
    other.private_key_pem.write_to_path(str(files["other-key"]))
    files["garbage"].write_bytes(b"\x89PNG\r\n\x1a\n not a certificate")
    key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
    files["encrypted-key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.BestAvailableEncryption(b"secret")))
    return files


def test_a_certificate_and_key_that_cannot_serve_tls_are_refused_before_listening(token_file, tmp_path, capsys):
    """Before: a garbage certificate was announced as 'listening on https://...' and then failed
    with '[SSL] PEM lib (_ssl.c:...)'; a mismatched key the same; an encrypted key made the server
    ask for a pass phrase on its terminal (a service hangs there)."""
    files = _tls_files(tmp_path)
    cases = [
        (files["garbage"], files["garbage"], str(files["garbage"])),
        (files["cert"], files["other-key"], "KEY_VALUES_MISMATCH"),
        (files["cert"], files["encrypted-key"], "is encrypted"),
    ]
    for cert, key, message in cases:
        assert cli.main(["serve", "--port", "0", "--token-file", str(token_file), "--tls-cert", str(cert),
                         "--tls-key", str(key)]) == 2
        out, err = capsys.readouterr()
        assert message in err and "listening" not in out, (cert, key, err)


# -- the server's URL, as a user types it ------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://[::1", "http://127.0.0.1:0"])
def test_a_malformed_server_url_is_refused_with_a_message(url, token_file, tmp_path, shared_data, capsys):
    """Before: ``--server http://127.0.0.1:99999`` and ``http://[::1`` were raw ValueError
    tracebacks (urllib's), from the CLI and from Slicer's settings alike."""
    with pytest.raises(ServerError, match="malformed"):
        ServerTarget(url, "a-token")
    folder = shared_data / "chaos_t2_fewshot"
    out = tmp_path / "out.nii.gz"
    assert cli.main(["segment", "--image", str(folder / "image_2.nii.gz"), "--support", str(folder / "label_2.nii.gz"),
                     "--out", str(out), "--method", "sam2", "--server", url, "--token-file", str(token_file)]) == 2
    assert "malformed" in capsys.readouterr().err and not out.exists()


def test_a_user_name_and_password_in_the_url_are_refused():
    """Before: ``http://user:secret@host`` was accepted and the password silently ignored (and kept
    in Slicer's settings in clear)."""
    with pytest.raises(ServerError, match="no user name or password") as refused:
        ServerTarget("http://user:secret@127.0.0.1:8765", "a-token")
    assert "secret" not in str(refused.value)


def test_a_url_with_the_api_path_is_not_blamed_on_the_token():
    """Before: ``--server http://host:port/v1`` (the API's path copied with the address) said
    'refused the token (401)': every path under the wrong prefix needs the token, /v1/health too."""
    with InProcessServer() as server:
        good = ServerClient(server.target())
        assert good.health()["service"] == "oflsam2"
        for url in (server.url + "/v1", server.url + "/v1/"):
            client = ServerClient(ServerTarget(url, server.token))
            with pytest.raises(ServerError, match="the URL's path is wrong") as refused:
                client.open_session()
            assert not isinstance(refused.value, ServerRefused)
        wrong_token = ServerClient(ServerTarget(server.url, "not-the-token"))
        with pytest.raises(ServerRefused, match="refused the token"):  # a wrong token is still called so
            wrong_token.open_session()


# -- adapters and the OFL-SAM2 preset ----------------------------------------------------------


def test_an_adapter_of_one_preset_is_refused_under_the_other(cohort, tiny_model, tmp_path):
    """Before: an adapter trained with the ``paper`` preset was used silently by an ``extended``
    run (and the other way round): the head trained for one set of choices ran under the other."""
    from cohort_data import read_array

    image = cohort.images / "image_2.nii.gz"
    out = tmp_path / "extended.nii.gz"
    extended = MethodOptions.extended(adapter=str(cohort.adapter))
    engine = Engine(cohort.settings, model=tiny_model)
    with pytest.raises(AdapterError, match="preset 'paper', this run uses 'extended'.*--ofl-preset paper"):
        pipeline.segment_files(image, None, out, labels=[1], method="ofl", settings=cohort.settings, options=extended,
                               engine=engine)
    assert not out.exists()
    with pytest.raises(AdapterError, match="--ofl-preset paper"):  # the engine's own loader (the worker, the server)
        volume = read_array(image).astype(np.float32)
        engine.segment(volume, [LabelSupport(1, "label_1", np.zeros(volume.shape, bool), [])], method="ofl", options=extended)
    job = BatchJob(method="ofl", labels=[1], settings=cohort.settings, options=extended)
    with pytest.raises(AdapterError, match="--ofl-preset paper"):  # a batch, before any case runs
        check_job(job, tmp_path / "batch")
    assert not (tmp_path / "batch").exists()
    paper = MethodOptions(adapter=str(cohort.adapter))  # its own preset: used
    pipeline.segment_files(image, None, tmp_path / "paper.nii.gz", labels=[1], method="ofl", settings=cohort.settings,
                           options=paper, engine=engine)
    assert (tmp_path / "paper.nii.gz").is_file()


def test_custom_options_are_not_compared_as_a_preset(cohort, tmp_path):
    """Options changed field by field (``custom``) are the user's choice; only the fields that
    change what the weights mean are compared (tau_init, sample_weights)."""
    from oflsam2.ofl.adapter_metadata import check_trained_with, list_adapters

    (adapter,) = list_adapters(cohort.adapter)
    check_trained_with(adapter, MethodOptions(accept_absent=True))
    with pytest.raises(AdapterError, match="tau_init"):
        check_trained_with(adapter, MethodOptions(tau_init="default"))
    unrecorded = {k: v for k, v in adapter.items() if k != "training"}  # written before presets were recorded
    check_trained_with(unrecorded, MethodOptions.extended())


@pytest.mark.parametrize("method", ["sam2", "revsam2", "forward"])
def test_an_ofl_preset_with_another_method_is_refused_not_ignored(method, tmp_path, shared_data, capsys):
    """Before: ``--ofl-preset extended --method sam2`` ran SAM2 and said nothing of the preset."""
    folder = shared_data / "chaos_t2_fewshot"
    out = tmp_path / "out.nii.gz"
    assert cli.main(["segment", "--image", str(folder / "image_2.nii.gz"), "--support", str(folder / "label_2.nii.gz"),
                     "--out", str(out), "--method", method, "--ofl-preset", "extended", "--random-weights"]) == 2
    assert "--ofl-preset applies to OFL-SAM2 only" in capsys.readouterr().err and not out.exists()
