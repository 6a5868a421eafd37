"""The HTTP routes (FastAPI on uvicorn), vLLM's wire format.

Every handler validates and tokenizes before it answers (so a bad request gets its 4xx before
any 200), then hands its choices to the engine thread (launch/server_engine.py) and waits for
deltas on an asyncio queue. Tokenizing and chat templates run in worker threads, never on the
event loop. A client that leaves aborts its request at once: streams are cancelled by Starlette
when the connection drops; non-streaming handlers watch the connection themselves.
"""
import asyncio
import json
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import server_protocol as proto
from .server_engine import Choice, EngineLoop, Unavailable
from .server_protocol import ApiError, bad


@dataclass
class ServerState:
    llm: object
    loop: EngineLoop
    metrics: object
    model_name: str
    model_dir: str
    max_model_len: int
    chat: proto.ChatTemplate
    api_key: str | None = None
    health_stall_s: float = 30.0
    request_timeout_s: float | None = None
    created: int = 0


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("stagger")
    except Exception:
        return "0.1.0"


class ApiKeyMiddleware:
    """Plain ASGI (streams pass through untouched): every path but /health needs the key."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if auth != f"Bearer {self.key}":
                resp = JSONResponse(ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                             code="invalid_api_key").body(), status_code=401)
                return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def build_app(st: ServerState) -> FastAPI:
    app = FastAPI(title="stagger", docs_url=None, redoc_url=None, openapi_url=None)
    if st.api_key:
        app.add_middleware(ApiKeyMiddleware, key=st.api_key)
    tok = st.llm.tokenizer

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return JSONResponse(ApiError(500, f"internal error: {e!r}").body(), status_code=500)

    async def read_body(request: Request) -> dict:
        request.state.arrival = time.time()   # metrics count from here, tokenizing included
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise bad("request body must be a JSON object")
        m = body.get("model")
        if m is not None and m not in (st.model_name, st.model_dir):
            raise ApiError(404, f"the model '{m}' does not exist; this server serves '{st.model_name}'",
                           "model", code="model_not_found")
        return body

    async def encode(prompt) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if tok is None:
            raise bad("this model has no tokenizer: send prompts as token ids", "prompt")
        return await asyncio.to_thread(tok.encode, prompt)

    def deadline(body) -> float | None:
        t = proto._num(body, "timeout", None, lo=0)
        limits = [x for x in (t, st.request_timeout_s) if x]
        return time.time() + min(limits) if limits else None

    # ---- generation --------------------------------------------------------------------------------
    async def generate(request, body, prompts: list[list[int]], params, n, chat: bool):
        arrival = request.state.arrival
        for ids in prompts:
            if len(ids) + params.max_tokens > st.max_model_len:
                raise bad(f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} exceeds the "
                          f"context length {st.max_model_len}", "max_tokens")
        stream = proto._bool(body, "stream")
        include_usage = proto.stream_options(body)
        if include_usage and not stream:
            raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
        aq: asyncio.Queue = asyncio.Queue()
        ev_loop = asyncio.get_running_loop()

        def sink(d):
            ev_loop.call_soon_threadsafe(aq.put_nowait, d)
        end = deadline(body)
        choices = [Choice(ids, p, sink, index=i * n + j, deadline=end, arrival=arrival, stream=stream)
                   for i, ids in enumerate(prompts) for j, p in enumerate(proto.choice_params(params, n))]
        try:
            rids = await asyncio.wrap_future(st.loop.submit(choices))
        except Unavailable as e:
            raise ApiError(503, str(e)) from None
        except ValueError as e:
            raise bad(str(e), "messages" if chat else "prompt") from None
        rid = proto.new_id("chatcmpl" if chat else "cmpl")
        meta = {"id": rid, "created": proto.now_s(), "model": st.model_name}
        if stream:
            gen = _stream(aq, choices, rids, meta, chat, n, include_usage, st.loop)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _collect(request, aq, choices, rids, meta, chat, n, st.loop)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompts = [await encode(p) for p in proto.parse_prompts(body)]
        params, n = proto.sampling(body, max_tokens_default=16, chat=False)
        return await generate(request, body, prompts, params, n, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        msgs = proto.parse_messages(body)
        if tok is None:
            raise bad("this model has no tokenizer: chat needs one", "messages")
        add_gen = proto._bool(body, "add_generation_prompt", True)
        text = await asyncio.to_thread(st.chat.render, msgs, add_gen)
        ids = await encode(text)
        room = st.max_model_len - len(ids)
        if room < 1:
            raise bad(f"the conversation is {len(ids)} tokens, beyond the context length {st.max_model_len}",
                      "messages")
        params, n = proto.sampling(body, max_tokens_default=room, chat=True)
        return await generate(request, body, [ids], params, n, chat=True)

    # ---- the rest ------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        card = {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "stagger",
                "root": st.model_dir, "parent": None, "max_model_len": st.max_model_len, "permission": []}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        ok, why = st.loop.healthy(st.health_stall_s)
        return Response(status_code=200) if ok else PlainTextResponse(why, status_code=503)

    @app.get("/version")
    async def version():
        return {"version": _version()}

    @app.get("/metrics")
    async def metrics():
        data = await asyncio.to_thread(st.metrics.render)
        return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_body(request)
        if "messages" in body:
            text = await asyncio.to_thread(st.chat.render, proto.parse_messages(body),
                                           proto._bool(body, "add_generation_prompt", True))
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise bad("give 'prompt' (a string) or 'messages'", "prompt")
        ids = await encode(text)
        return {"count": len(ids), "max_model_len": st.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_body(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise bad("'tokens' must be a list of integers", "tokens")
        if tok is None:
            raise bad("this model has no tokenizer", "tokens")
        vocab = st.llm.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise bad(f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": await asyncio.to_thread(tok.decode, ids)}

    return app


# ---- response assembly ----------------------------------------------------------------------------
def _error_of(reason: str) -> ApiError | None:
    if reason == "timeout":
        return ApiError(408, "the request's deadline passed before it finished", type_="timeout",
                        code="timeout")
    if reason == "shutdown":
        return ApiError(503, "the server shut down before the request finished")
    if reason == "error: instance lost":   # a global scheduler's instance died after tokens were sent
        return ApiError(502, "the instance running this request was lost after part of its output had "
                        "been sent (a restart would not continue it); retry the request",
                        code="instance_lost")
    if reason and reason.startswith("error"):
        return ApiError(500, f"the engine failed this request: {reason}")
    return None


def _usage(finals: dict, n: int) -> dict:
    """Prompt tokens count once per prompt (choice index i*n + j answers prompt i), as OpenAI does."""
    firsts = [d for i, d in finals.items() if i % n == 0]
    completion = sum(d.completion_tokens for d in finals.values())
    return proto.usage(sum(d.prompt_tokens for d in firsts), completion,
                       sum(d.cached_tokens for d in firsts))


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _collect(request, aq, choices, rids, meta, chat, n, loop: EngineLoop):
    texts = {c.index: [] for c in choices}
    finals = {}
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        while len(finals) < len(choices):
            get = asyncio.ensure_future(aq.get())
            done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                return Response(status_code=499)   # nobody is listening
            d = get.result()
            texts[d.index].append(d.text)
            if d.finish_reason is not None:
                err = _error_of(d.finish_reason)
                if err is not None:
                    raise err
                finals[d.index] = d
    finally:
        gone.cancel()
        if len(finals) < len(choices):
            loop.abort(rids)
    out = []
    for i in sorted(finals):
        d, text = finals[i], "".join(texts[i])
        if chat:
            out.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": d.finish_reason, "stop_reason": None})
        else:
            out.append({"index": i, "text": text, "logprobs": None, "finish_reason": d.finish_reason,
                        "stop_reason": None})
    obj = "chat.completion" if chat else "text_completion"
    return JSONResponse({**meta, "object": obj, "choices": out, "usage": _usage(finals, n)})


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(aq, choices, rids, meta, chat, n, include_usage, loop: EngineLoop):
    obj = "chat.completion.chunk" if chat else "text_completion"
    finals, started = {}, set()
    try:
        while len(finals) < len(choices):
            d = await aq.get()
            err = _error_of(d.finish_reason) if d.finish_reason else None
            if err is not None:
                finals[d.index] = d
                yield _sse(err.body())
                break
            if not d.text and d.finish_reason is None and (d.index in started or not d.token_ids):
                continue   # nothing to say yet (a stop string may still match the held-back text)
            if chat:
                delta = {"content": d.text}
                if d.index not in started:
                    delta = {"role": "assistant", **delta}
                choice = {"index": d.index, "delta": delta, "logprobs": None,
                          "finish_reason": d.finish_reason}
            else:
                choice = {"index": d.index, "text": d.text, "logprobs": None,
                          "finish_reason": d.finish_reason}
            started.add(d.index)
            if d.finish_reason is not None:
                finals[d.index] = d
            yield _sse({**meta, "object": obj, "choices": [choice]})
        else:
            if include_usage:
                yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(finals, n)})
        yield "data: [DONE]\n\n"
    finally:
        if len(finals) < len(choices) or any(_error_of(d.finish_reason) for d in finals.values()):
            loop.abort(rids)
