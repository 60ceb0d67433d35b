"""``oflsam2 serve``: the engine behind HTTP(S) for Slicer and CLI clients without a GPU.

FastAPI and uvicorn are imported only when the command runs (the ``server`` extra), so that
the rest of the CLI neither needs nor waits for them.
"""

from __future__ import annotations

import math
import socket
import sys
import threading

from ..errors import InputError, OFLSAM2Error
from ..settings import DEVICES
from .config import DEFAULT_HOST, DEFAULT_PORT, Limits, ServerConfig, check_listen_address, server_token

INSTALL_HINT = ("oflsam2 serve needs FastAPI and uvicorn: pip install 'oflsam2[server]' (in a source checkout: "
                "bash scripts/setup.sh --server).")


def register_serve_command(commands) -> None:
    limits = Limits()
    parser = commands.add_parser(
        "serve",
        help="segment for Slicer and CLI clients over the network (one GPU box shared by a department)",
        description=(
            "Run the engine as an HTTP(S) server: Slicer ('Compute on: a server') and the CLI (--server URL "
            "--token-file FILE) send their volumes and annotated slices and get the slices back as they are "
            "computed. One model per device is shared by every client; each client's data stays in its own session."
        ),
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s: this computer only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s; 0: any free port, printed)")
    parser.add_argument("--token-file", help="file holding the clients' token (default: made in your config folder)")
    parser.add_argument("--tls-cert", help="TLS certificate (PEM) to serve HTTPS directly")
    parser.add_argument("--tls-key", help="its private key (PEM)")
    parser.add_argument("--allow-insecure-http", action="store_true",
                        help="serve plain HTTP on a non-loopback --host (only on a private, trusted network)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="compute device for every job (default %(default)s)")
    group = parser.add_argument_group("limits")
    group.add_argument("--max-sessions", type=int, default=limits.max_sessions, help="open client sessions (default %(default)s)")
    group.add_argument("--max-upload-mb", type=int, default=limits.max_upload_bytes >> 20,
                       help="largest array or file one upload may hold (default %(default)s)")
    group.add_argument("--max-voxels", type=int, default=limits.max_voxels, help="voxels of one volume (default %(default)s)")
    group.add_argument("--max-queued-jobs", type=int, default=limits.max_queued_jobs,
                       help="jobs waiting for the device, all clients together (default %(default)s)")
    group.add_argument("--session-idle-minutes", type=float, default=limits.session_idle_seconds / 60,
                       help="a session unused this long is closed and its data removed (default %(default)s)")
    parser.add_argument("--stop-with-stdin", action="store_true",
                        help="stop when standard input closes (for a supervisor or a test that started the server)")
    parser.set_defaults(func=run_serve)


def run_serve(args) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise OFLSAM2Error(f"{INSTALL_HINT} ({exc})") from None
    if not 0 <= args.port <= 65535:  # the socket layer would take it modulo 65536 and listen elsewhere
        raise InputError(f"--port must be from 0 to 65535 (0: any free port); got {args.port}.")
    tls = _tls_files(args.tls_cert, args.tls_key)
    check_listen_address(args.host, bool(tls), args.allow_insecure_http)
    limits = _limits(args)
    token, token_path, created = server_token(args.token_file)
    device, label = _device(args.device)
    config = ServerConfig(token, device=device, limits=limits, device_label=label, models=_models_here())
    listener = _listen(args.host, args.port)
    port = listener.getsockname()[1]
    scheme = "https" if tls else "http"
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"oflsam2 serve: listening on {scheme}://{host}:{port} (version {_version()}, device {label})", flush=True)
    print(f"oflsam2 serve: token {'made and ' if created else ''}kept in {token_path}; give clients that file "
          "(--token-file) or its text (Slicer's token field)", flush=True)
    server = uvicorn.Server(uvicorn.Config(
        create_app(config), log_level="warning", access_log=False, timeout_keep_alive=30,
        ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None,
    ))
    if args.stop_with_stdin:
        threading.Thread(target=_stop_at_end_of_stdin, args=(server,), name="oflsam2-serve-stdin", daemon=True).start()
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn stopped cleanly on Ctrl+C or SIGTERM, then passes the signal on
        pass
    print("oflsam2 serve: stopped; every session's data was removed", flush=True)
    return 0


def _stop_at_end_of_stdin(server) -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    server.should_exit = True


def _tls_files(cert, key):
    if bool(cert) != bool(key):
        raise InputError("Give both --tls-cert and --tls-key (the certificate and its private key), or neither.")
    if not cert:
        return None
    import os

    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not os.path.isfile(path):
            raise InputError(f"{flag} {path} is not a file.")
    _load_tls(cert, key)
    return cert, key


def _load_tls(cert: str, key: str) -> None:
    """Load the pair as the server will, so that a bad one is refused before anything is printed
    (an encrypted key is refused rather than asked for on the terminal)."""
    import ssl

    def no_passphrase():
        raise InputError(f"--tls-key {key} is encrypted; give it decrypted (openssl pkey -in {key} -out plain-key.pem).")

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=no_passphrase)
    except (ssl.SSLError, OSError) as exc:
        raise InputError(f"--tls-cert {cert} and --tls-key {key} cannot serve TLS ({getattr(exc, 'reason', None) or exc}): "
                         "give a PEM certificate and the private key it was made with.") from None


def _limits(args) -> Limits:
    values = {"--max-sessions": args.max_sessions, "--max-upload-mb": args.max_upload_mb, "--max-voxels": args.max_voxels,
              "--max-queued-jobs": args.max_queued_jobs, "--session-idle-minutes": args.session_idle_minutes}
    for flag, value in values.items():
        if not math.isfinite(value) or value <= 0:
            raise InputError(f"{flag} must be above 0; got {value}.")
    return Limits(max_sessions=args.max_sessions, max_upload_bytes=args.max_upload_mb << 20, max_voxels=args.max_voxels,
                  max_queued_jobs=args.max_queued_jobs, session_idle_seconds=max(1, round(args.session_idle_minutes * 60)),
                  max_session_bytes=max(Limits.max_session_bytes, 4 * (args.max_upload_mb << 20)))


def _device(name: str) -> tuple[str, str]:
    from ..backend import pick_device

    device = pick_device(name)
    label = device.type
    if device.type == "cuda":
        import torch

        label = f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type, label


def _models_here() -> list[str]:
    from ..checkpoints import cached_path, load_manifest

    return [name for name in load_manifest() if cached_path(name).is_file()]


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that the port (also a free one, 0) is known before serving."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as exc:
        raise InputError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}. Choose another --port (or --host).") from None
    return listener


def _version() -> str:
    from ..version import __version__

    return __version__
