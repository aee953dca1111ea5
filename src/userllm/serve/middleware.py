"""The server's ASGI middleware: the API key, the request size limit and the request metrics."""

from __future__ import annotations

import hmac
import time

from starlette.responses import JSONResponse

from userllm.serve.protocol import APIError, ServeConfig, error_body


class Guard:
    """ASGI middleware (pure ASGI: it runs for every request): the API key (every path but /healthz), the
    request body size limit, and the request metrics (count and latency by endpoint and status)."""

    def __init__(self, app, cfg: ServeConfig, metrics) -> None:
        self.app, self.cfg, self.metrics = app, cfg, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_status)
        finally:
            endpoint = scope["route"].path if scope.get("route") is not None else "other"
            self.metrics.inc("userllm_requests_total", endpoint=endpoint, status=str(status[0]))
            self.metrics.observe("userllm_request_seconds", time.perf_counter() - start, endpoint=endpoint)

    async def _guarded(self, scope, receive, send):
        if self.cfg.api_key and scope["path"] != "/healthz":
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.cfg.api_key}".encode()):
                body = error_body(
                    401, "invalid or missing API key (send `Authorization: Bearer KEY`)", code="invalid_api_key"
                )
                return await JSONResponse(body, status_code=401)(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = error_body(413, f"request body over {self.cfg.max_body_bytes:,} bytes", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.cfg.max_body_bytes:
            return await JSONResponse(too_big, status_code=413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.cfg.max_body_bytes:
                raise APIError(413, too_big["error"]["message"], code="request_too_large")
            return message

        return await self.app(scope, limited, send)
