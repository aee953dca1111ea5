"""The HTTP API of ``userllm serve``: OpenAI's Chat Completions schema, personalized by the request's
``user``, over users' events in the store.

===================================  ======================================================================
endpoint                             what it does
===================================  ======================================================================
``POST /v1/users/{user_id}/events``  append ``{"events": [{"item_id", "rating", "timestamp", "text"?,
                                     "event_id"?}, ...]}``; committed before the 200; returns the user's
                                     event count. A repeated ``event_id`` adds nothing (retries)
``GET /v1/users/{user_id}/events``   ``{"object": "list", "data": [...]}``, oldest first (``?limit=N``: newest N)
``DELETE /v1/users/{user_id}``       the user's events and cached context are gone
``POST /v1/chat/completions``        Chat Completions (``messages``, ``user``, ``max_tokens``, ``temperature``,
                                     ``top_p``, ``stop``, ``seed``, ``stream``; vLLM's ``ignore_eos``);
                                     ``usage`` adds ``user_events``
``GET /v1/models``                   the served run
``GET /healthz``                     liveness (no API key needed)
``GET /metrics``                     Prometheus text (:mod:`userllm.serve.metrics`)
===================================  ======================================================================

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the status that fits
(400, 401, 404, 413, 422, 500); no traceback ever reaches a client. Concurrent appends are committed
together (one transaction per group, each acknowledged after its commit). Chat requests are batched for the model
(up to ``max_batch`` requests, waiting at most ``max_wait_ms`` for more), which runs on its own thread, so
health checks and appends stay responsive while it decodes.

Example::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="userllm-RUN", user="42",
                                   messages=[{"role": "user", "content": "Which movie should I watch next?"}])
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from userllm.serve.engine import Engine
from userllm.serve.jobs import Job
from userllm.serve.middleware import Guard
from userllm.serve.protocol import APIError, ChatRequest, EventsIn, ServeConfig, error_body
from userllm.serve.workers import AppendWriter, Batcher

USER_ID = re.compile(r"^[A-Za-z0-9._:@+\-]{1,128}$")


# ----------------------------------------------------------------------------- batching
def create_app(engine: Engine, cfg: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application serving ``engine`` (see module docstring)."""
    cfg = cfg or ServeConfig()
    metrics = engine.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher, app.state.writer = Batcher(engine, cfg), AppendWriter(engine)
        tasks = [asyncio.create_task(app.state.batcher.run()), asyncio.create_task(app.state.writer.run())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await run_in_threadpool(engine.close)

    app = FastAPI(title="userllm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(Guard, cfg=cfg, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(error_body(e.status, e.message, e.param, e.code, e.kind), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first["loc"] if x != "body"]
        param = "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc).lstrip(".") or None
        if first["type"] == "json_invalid":
            return JSONResponse(
                error_body(400, f"the body is not valid JSON: {first['msg']}", code="invalid_json"), 400
            )
        return JSONResponse(error_body(422, f"{param or 'body'}: {first['msg']}", param, "invalid_value"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crash(_, e: Exception):
        return JSONResponse(error_body(500, f"internal error ({type(e).__name__}); see the server's log"), 500)

    async def check_prompt_length(user: str | None, messages: list[dict[str, str]]) -> None:
        """A 400 naming both lengths, before any model work, for a prompt longer than the server accepts:
        ``max_prompt_tokens``, else the model's context."""
        limit = cfg.max_prompt_tokens or engine.context_length
        if limit is None:
            return
        tokens = await run_in_threadpool(engine.prompt_tokens, user, messages)
        if tokens > limit:
            why = "--max-prompt-tokens" if cfg.max_prompt_tokens else "the model's context"
            raise APIError(
                400,
                f"the prompt is {tokens:,} tokens; this server accepts at most {limit:,} ({why})",
                param="messages",
                code="context_length_exceeded",
            )

    def check_user(user_id: str) -> str:
        if not USER_ID.match(user_id):
            raise APIError(
                422, "user_id: 1-128 characters of letters, digits and ._:@+-", param="user_id", code="invalid_value"
            )
        return user_id

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": engine.name}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": engine.name, "object": "model", "created": 0, "owned_by": "userllm", "method": engine.method}
            ],
        }

    # the body is parsed and validated in one step by pydantic-core (FastAPI's body parameter would decode the
    # JSON in Python first, then validate): appends are the endpoint that takes thousands of requests a second
    @app.post(
        "/v1/users/{user_id}/events",
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": EventsIn.model_json_schema()}}}
        },
    )
    async def append(user_id: str, request: Request):
        check_user(user_id)
        try:
            body = EventsIn.model_validate_json(await request.body())
        except ValidationError as e:  # the same 400 / 422 as any other request's body
            raise RequestValidationError(e.errors(include_url=False)) from None
        if len(body.events) > cfg.max_events_per_request:
            raise APIError(
                413,
                f"at most {cfg.max_events_per_request:,} events per request, got {len(body.events):,}",
                param="events",
                code="request_too_large",
            )
        rows = [e.model_dump() for e in body.events]
        problems = engine.vocab.problems(rows)
        if problems:
            raise APIError(422, problems[0][1], param=problems[0][0], code="invalid_value")
        count = await request.app.state.writer.append(user_id, rows)  # committed with any concurrent appends
        metrics.inc("userllm_events_appended_total", len(rows))
        engine.schedule_refresh(user_id)
        return {"object": "user", "id": user_id, "events": count}

    @app.get("/v1/users/{user_id}/events")
    async def list_events(user_id: str, limit: int | None = None):
        check_user(user_id)
        if limit is not None and limit < 1:
            raise APIError(422, "limit: expected a positive number", param="limit", code="invalid_value")
        _, rows = await run_in_threadpool(engine.store.timeline, user_id, limit)
        return {"object": "list", "data": rows}

    @app.delete("/v1/users/{user_id}")
    async def forget(user_id: str):
        check_user(user_id)
        deleted = await run_in_threadpool(engine.store.delete_user, user_id)
        await asyncio.get_running_loop().run_in_executor(engine.executor, engine.forget, user_id)
        return {"object": "user.deleted", "id": user_id, "deleted": True, "events": deleted}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        if body.model != engine.name:
            raise APIError(
                404,
                f"model {body.model!r} is not served here; this server serves {engine.name!r}",
                param="model",
                code="model_not_found",
            )
        if body.user is None:
            if not cfg.allow_unknown_users:
                raise APIError(
                    400,
                    "the request names no `user` whose events personalize the answer "
                    "(start the server with --allow-unknown-users to answer without one)",
                    param="user",
                )
        else:
            check_user(body.user)
            fp = await run_in_threadpool(engine.store.fingerprint, body.user)
            if fp.count == 0 and not cfg.allow_unknown_users:
                raise APIError(
                    404,
                    f"user {body.user!r} has no events in the store; append some with "
                    f"POST /v1/users/{body.user}/events first",
                    param="user",
                    code="user_not_found",
                )
        max_tokens = body.max_completion_tokens or body.max_tokens or cfg.max_tokens
        if max_tokens > cfg.max_tokens:
            raise APIError(
                422, f"max_tokens: at most {cfg.max_tokens} on this server", param="max_tokens", code="invalid_value"
            )
        messages = [m.text() for m in body.messages]
        await check_prompt_length(body.user, messages)
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        job = Job(
            user=body.user,
            messages=messages,
            max_tokens=max_tokens,
            deadline=engine.clock() + cfg.request_timeout_s,
            emit=lambda kind, payload: loop.call_soon_threadsafe(out.put_nowait, (kind, payload)),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        )
        await request.app.state.batcher.queue.put(job)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            text, check = [], loop.time() + 1.0
            while True:
                try:
                    kind, payload = await asyncio.wait_for(out.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    kind = None
                if loop.time() >= check:  # a client that has gone is noticed within a second or so, and dropped
                    check = loop.time() + 1.0
                    if await request.is_disconnected():
                        job.cancel("client")
                        return PlainTextResponse("", status_code=499)
                if kind is None:
                    continue
                if kind == "delta":
                    text.append(payload)
                elif kind == "error":
                    raise payload
                else:
                    break
            message = {"role": "assistant", "content": "".join(text)}
            return {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": engine.name,
                "choices": [
                    {"index": 0, "message": message, "finish_reason": payload["finish_reason"], "logprobs": None}
                ],
                "usage": payload["usage"],
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        start = time.perf_counter()

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
            data = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": engine.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
            }
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events():
            done = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                first = True
                while True:
                    kind, payload = await out.get()
                    if kind == "delta":
                        if first:
                            metrics.observe("userllm_time_to_first_token_seconds", time.perf_counter() - start)
                            first = False
                        yield chunk({"content": payload})
                    elif kind == "error":
                        e = payload if isinstance(payload, APIError) else None
                        body = (
                            error_body(e.status, e.message, e.param, e.code, e.kind)
                            if e
                            else error_body(500, f"internal error ({type(payload).__name__})")
                        )
                        yield f"data: {json.dumps(body)}\n\n"
                        break
                    else:
                        yield chunk({}, payload["finish_reason"])
                        if include_usage:
                            yield chunk({}, usage=payload["usage"], choices=False)
                        break
                done = True
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or the server ended the stream): the model stops decoding for it
                if not done:
                    job.cancel("client")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
