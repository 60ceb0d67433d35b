"""Bearer-token authentication as pure ASGI middleware, in front of the router.

Every request but ``GET /v1/health`` needs ``Authorization: Bearer <token>``; a path that does
not exist answers 401 too, so that a stranger learns nothing of the API. The token is compared
in constant time (``hmac.compare_digest``), and no request body is read before it matches.
"""

from __future__ import annotations

import hmac
import json

OPEN_PATHS = frozenset({"/v1/health"})
OPEN_METHODS = frozenset({"GET", "HEAD"})
UNAUTHORIZED = ("This OFLSAM2 server needs its token: send 'Authorization: Bearer <token>' (the CLI's --token-file, "
                "Slicer's token field). The token is in the file the server named when it started.")


class BearerAuth:
    def __init__(self, app, token: str):
        self.app = app
        self._expected = f"Bearer {token}".encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets here: close before anything is routed
            await send({"type": "websocket.close", "code": 1008})
            return
        if (scope["path"] in OPEN_PATHS and scope["method"] in OPEN_METHODS) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": UNAUTHORIZED}).encode("utf-8")
        await send({
            "type": "http.response.start", "status": 401,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"www-authenticate", b'Bearer realm="oflsam2"'), (b"connection", b"close")],
        })
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope) -> bool:
        given = [value for name, value in scope.get("headers", ()) if name.lower() == b"authorization"]
        # compare_digest on every request, also a wrong-length one: its time depends on the length only
        return len(given) == 1 and hmac.compare_digest(given[0], self._expected)
