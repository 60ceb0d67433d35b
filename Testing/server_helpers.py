"""Real ``oflsam2 serve`` servers for the tests, on 127.0.0.1 at a free port.

:class:`ServerProcess` is the command as a user starts it (``python -m oflsam2.cli serve``), with
``--stop-with-stdin``: it stops when the test closes its standard input, and also when the test
process dies without doing so. :class:`InProcessServer` is the same app and uvicorn on a thread
of the test, for the tests that give it an engine of their own (a failing or blocking one).
Both are context managers that always stop what they started.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START_SECONDS = 300.0  # importing torch on a loaded 2-core machine
FAST_SETTINGS = {"model": "sam2.1-tiny", "random_weights": True, "device": "cpu", "image_size": 256}


def write_token(folder: Path) -> tuple[str, Path]:
    token = secrets.token_urlsafe(24)
    path = Path(folder) / "token"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(token + "\n")
    return token, path


class ServerProcess:
    """``oflsam2 serve`` in a process of its own; ``port`` 0: a free one."""

    def __init__(self, folder: Path, *args: str, port: int = 0, token_file: Path | None = None, scheme: str = "http"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if token_file is None:
            self.token, self.token_file = write_token(self.folder)
        else:
            self.token_file = Path(token_file)
            self.token = self.token_file.read_text().strip()
        (self.folder / "tmp").mkdir(exist_ok=True)  # what a killed server leaves stays in the test's folder
        env = dict(os.environ, OFLSAM2_CONFIG_DIR=str(self.folder / "config"), TMPDIR=str(self.folder / "tmp"),
                   PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "oflsam2.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--device",
                   "cpu", "--token-file", str(self.token_file), "--stop-with-stdin", *args]
        self.log = open(self.folder / f"server-{time.monotonic_ns()}.log", "w")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        cwd=REPO, env=env)
        self.url = self._wait_for_url(scheme)
        self.port = int(self.url.rsplit(":", 1)[1])

    def _wait_for_url(self, scheme: str) -> str:
        found: list[str] = []

        def read():
            for line in self.process.stdout:
                match = re.search(rf"listening on ({scheme}://\S+)", line)
                if match:
                    found.append(match.group(1))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(START_SECONDS)
        if not found:
            self.stop()
            raise RuntimeError(f"the server did not start: {self.log_text()[-3000:]}")
        return found[0]

    def target(self, **kwargs):
        from oflsam2.client import ServerTarget

        return ServerTarget(self.url, self.token, **kwargs)

    def kill9(self) -> None:
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()  # --stop-with-stdin: a clean shutdown
            except OSError:
                pass
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self.log.close()

    def log_text(self) -> str:
        return Path(self.log.name).read_text()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class InProcessServer:
    """The server app under uvicorn on a thread of this process."""

    def __init__(self, engine_factory=None, limits=None, tls: tuple[str, str] | None = None, state_dir=None):
        import uvicorn

        from oflsam2.server.app import create_app
        from oflsam2.server.config import Limits, ServerConfig

        self.token = secrets.token_urlsafe(24)
        self.config = ServerConfig(self.token, device="cpu", limits=limits or Limits(), state_dir=state_dir)
        self.asgi = create_app(self.config, engine_factory)
        self.app = self.asgi.app  # the FastAPI app behind the token check
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.asgi, log_level="warning", access_log=False,
                                                    ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)

    def target(self, **kwargs):
        from oflsam2.client import ServerTarget

        return ServerTarget(self.url, self.token, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def chaos_crop(shared_data: Path, number: int = 2, slices: int = 6, size: int = 96):
    """CHAOS T2 case ``number`` cropped around the liver's middle: (image float32, labels uint8, sitk image)."""
    import numpy as np
    import SimpleITK as sitk

    folder = shared_data / "chaos_t2_fewshot"
    image = sitk.ReadImage(str(folder / f"image_{number}.nii.gz"))
    labels = sitk.ReadImage(str(folder / f"label_{number}.nii.gz"))
    liver = np.flatnonzero((np.rint(sitk.GetArrayFromImage(labels)) == 1).any(axis=(1, 2)))
    first = int(liver[len(liver) // 2]) - slices // 2
    y, x = (np.argwhere(np.rint(sitk.GetArrayFromImage(labels))[first + slices // 2] == 1).mean(axis=0)).astype(int)
    y0 = int(min(max(0, y - size // 2), image.GetSize()[1] - size))
    x0 = int(min(max(0, x - size // 2), image.GetSize()[0] - size))
    crop = (slice(x0, x0 + size), slice(y0, y0 + size), slice(first, first + slices))
    image, labels = image[crop], labels[crop]
    return (sitk.GetArrayFromImage(image).astype(np.float32), np.rint(sitk.GetArrayFromImage(labels)).astype(np.uint8),
            image)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
