"""The OpenAI-compatible HTTP app over one engine (see pipeline/server/__init__.py to run it).

    app = create_app(engine, model_name="smollm2-135m", keys=["sk-..."], info={...})
    uvicorn.run(app, host="127.0.0.1", port=23333)

Routes: GET /health, GET /v1/models, GET /v1/models/{id}, GET /openapi.json, POST /v1/chat/completions, POST /v1/completions (both with
`stream: true` as server-sent events; logprobs, echo, n: see logprobs.py), POST /tokenize, POST /detokenize,
GET /tokenizer_info (tokenize.py), GET / (the chat page, static/). Every error is an OpenAI-style
JSON body {"error": {"message", "type", "param", "code"}}; a bad request never stops the server.
Concurrent requests go to the engine at once; its persistent batching runs them together and queues
what the KV cache cannot hold yet.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
import uuid
from pathlib import Path
from typing import List, Optional, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine.params import SamplingParams
from . import tools
from .logprobs import ChoiceLogprobs, merge
from .metrics import Metrics
from .responses import ResponsesRequest, respond
from .schemas import SEED_MAX, ApiError, ChatRequest, CompletionRequest, parse_body, read_body
from .tokenize import DetokenizeRequest, TokenizeRequest, tokenizer_routes
from .sse import EngineStream, sse, wait_disconnect

log = logging.getLogger("pipeline.server")
STATIC = Path(__file__).parent / "static"
# what a request that leaves a setting out gets (serve.* in the config overrides these)
DEFAULTS = {"max_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "min_p": 0.0}


class Pending:
    """The engine handles of one HTTP request; cancel() stops those still running (client gone, error)."""

    def __init__(self, counts: dict, handles: list, metrics: Optional[Metrics] = None):
        self.counts, self.handles, self.open, self.metrics = counts, handles, set(range(len(handles))), metrics

    def finished(self, i: int, reason: Optional[str]) -> None:
        if i in self.open:
            self.open.discard(i)
            self.counts["requests_cancelled"] += reason == "cancelled"

    def cancel(self) -> None:
        for i in sorted(self.open):
            self.handles[i].cancel()      # the engine frees its KV blocks at its next step
            self.finished(i, "cancelled")
            if self.metrics is not None:  # ended here, its last output never handed on: vLLM's "abort"
                self.metrics.aborted()


async def _arrivals(handles: list):
    """Lists of (choice index, output) as the handles' outputs arrive, each list what is there at one wake-up; an
    exception of a handle arrives as its output. One handle (n = 1, the usual case) is read directly; several are
    merged through a queue by one task each."""
    if len(handles) == 1:
        h = handles[0]
        while True:
            try:
                outs = await h.next_outputs()
            except StopAsyncIteration:
                return
            except Exception as e:   # noqa: BLE001 - reported to the client as an error event
                yield [(0, e)]
                return
            yield [(0, out) for out in outs]
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h) -> None:
        try:
            async for out in h.aiter():
                await queue.put((i, out))
        except Exception as e:   # noqa: BLE001 - reported to the client as an error event
            await queue.put((i, e))
    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            yield batch
    finally:
        for t in tasks:
            t.cancel()


class Server:
    """Request -> engine submissions -> OpenAI response objects."""

    def __init__(self, engine, model_name: str, defaults: dict, info: dict, aliases: Sequence[str] = ()):
        self.engine, self.model_name, self.info = engine, model_name, info
        self.names = [model_name, *(a for a in aliases if a != model_name)]   # what a request may call the model
        self.defaults = {**DEFAULTS, **defaults}
        self.counts = {"requests_total": 0, "requests_cancelled": 0, "requests_failed": 0}
        # streamed requests' time in this process (seconds, summed; /health's frontend_latency): the request's
        # arrival -> handed to the engine (submit_s), -> its first token's event yielded (ttft_s)
        self.latency = {"streams": 0, "submit_s": 0.0, "first_chunks": 0, "ttft_s": 0.0}
        self.metrics = Metrics(model_name, engine.stats)   # GET /metrics (metrics.py)
        self.session_len = int(engine.stats()["session_len"])

    # ------------------------------------------------------------------ request -> prompts, params
    def check_model(self, name: str) -> None:
        if name not in self.names:
            served = " or ".join(f"'{n}'" for n in self.names)
            raise ApiError(404, f"the model '{name}' does not exist; this server serves {served}",
                           param="model", code="model_not_found")

    def chat_prompt(self, req: ChatRequest) -> List[int]:
        msgs, fns = tools.prompt_messages(req, getattr(self.engine.tokenizer, "chat_template", None))
        return list(self.engine.apply_chat_template(msgs, fns))

    def completion_prompts(self, req: CompletionRequest) -> tuple[List[List[int]], List[Optional[str]]]:
        """Token ids of each prompt, and its text where given as text (echo decodes the others)."""
        p = req.prompt
        if isinstance(p, list) and isinstance(p[0], int):
            return [list(p)], [None]            # the engine checks the ids against its vocabulary
        if isinstance(p, list) and isinstance(p[0], list):
            return [list(x) for x in p], [None] * len(p)     # a batch of token-id lists (lm-eval)
        texts = [p] if isinstance(p, str) else p
        return [list(self.engine.tokenizer(t)["input_ids"]) for t in texts], list(texts)

    def params(self, req, n_prompt: int) -> SamplingParams:
        room = self.session_len - n_prompt
        if room <= 0:
            raise ApiError(400, f"the prompt is {n_prompt} tokens, but session_len is {self.session_len}: shorten "
                           "the prompt (or serve with a larger serve.session_len)",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        want = req.requested_max_tokens()
        if want is not None and want > room:
            raise ApiError(400, f"max_tokens={want} + the prompt's {n_prompt} tokens = {want + n_prompt} is over "
                           f"session_len={self.session_len}; ask for at most {room} new tokens",
                           param="max_tokens", code="context_length_exceeded")
        d = self.defaults
        pick = lambda name: getattr(req, name) if getattr(req, name) is not None else d[name]  # noqa: E731
        sp = SamplingParams(max_new_tokens=want if want is not None else min(d["max_tokens"], room),
                            temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"),
                            repetition_penalty=pick("repetition_penalty"), seed=req.seed,
                            stop=req.stop_list(), ignore_eos=req.ignore_eos, min_p=pick("min_p"),
                            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
                            json_schema=tools.constraint(req))
        sp.logprobs = req.logprobs_k()
        if getattr(req, "echo", False) and (sp.logprobs is not None or sp.max_new_tokens == 0):
            sp.prompt_logprobs = sp.logprobs or 0       # echo: the prompt's logprobs (max_tokens 0: scoring only)
        try:
            sp.validate()
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return sp

    def submit(self, prompts: Sequence[List[int]], req) -> Pending:
        params = [self.params(req, len(p)) for p in prompts]       # validate all before submitting any
        handles = []
        try:
            for p, sp in zip(prompts, params):     # n choices a prompt: the engine computes its KV blocks once
                for j in range(req.n):
                    seed = sp.seed if sp.seed is None or j == 0 else (sp.seed + j) % (SEED_MAX + 1)
                    handles.append(self.engine.submit(p, dataclasses.replace(sp, seed=seed)))
        except ValueError as e:                                    # e.g. the engine's own session_len check
            for h in handles:
                h.cancel()
            raise ApiError(400, str(e), code="context_length_exceeded" if "session_len" in str(e) else None) from None
        self.counts["requests_total"] += len(handles)
        return Pending(self.counts, handles, self.metrics)

    # ------------------------------------------------------------------ engine -> responses
    async def collect(self, request: Request, pending: Pending, t_arrival: Optional[float] = None) -> list[dict]:
        """Run the requests to the end (cancelled if the client leaves); per request: text, reason, usage."""
        watcher = asyncio.ensure_future(wait_disconnect(request.receive, pending.cancel))

        async def one(i: int, h) -> dict:
            parts, res = [], {"finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0, "error": None,
                              "token_ids": [], "logprobs": None, "prompt_logprobs": None}
            timer = self.metrics.request(t_arrival)
            async for out in h.aiter():
                timer.observe(out)
                parts.append(out.text)
                res["token_ids"] += out.token_ids
                if out.logprobs is not None:
                    res["logprobs"] = (res["logprobs"] or []) + out.logprobs
                if out.prompt_logprobs is not None:
                    res["prompt_logprobs"] = out.prompt_logprobs
                if out.finished:
                    pending.finished(i, out.finish_reason)
                    res.update(finish_reason=out.finish_reason, prompt_tokens=out.num_prompt_tokens,
                               completion_tokens=out.num_generated_tokens, error=out.error)
            return {**res, "text": "".join(parts)}
        try:
            results = await asyncio.gather(*(one(i, h) for i, h in enumerate(pending.handles)))
        finally:
            watcher.cancel()
            pending.cancel()
        for r in results:
            if r["finish_reason"] == "error":
                self.counts["requests_failed"] += 1
                raise ApiError(500, f"generation failed: {r['error']}", type="server_error")
        return results

    async def stream(self, pending: Pending, rid: str, created: int, replies: Optional[list], include_usage: bool,
                     continuous: bool, echo: Optional[list] = None, echo_logprobs: bool = False, n: int = 1,
                     t_arrival: Optional[float] = None):
        """SSE events of every handle, merged as they arrive; then usage (if asked) and [DONE].
        replies: chat only, each choice's tools.Reply (its text as content or tool-call deltas).
        continuous: each text chunk carries its request's usage so far (live tokens/s in the page).
        echo: per prompt (prompt ids, its text or None) for completions with echo: sent as each choice's first chunk
        (with the prompt's logprobs if echo_logprobs).
        n: choices per prompt (choice i answers prompt i // n).
        t_arrival: the request's perf_counter() on arrival (each choice's first token counted in `latency`)."""
        chat = replies is not None
        kind = "chat.completion.chunk" if chat else "text_completion"
        fmt = ChoiceLogprobs(self.engine.tokenizer, chat)

        def chunk(i: int, text: Optional[str], reason: Optional[str], first: bool = False, delta=None,
                  logprobs=None) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else (delta or {})
                choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": logprobs}
            return {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}

        handles = pending.handles
        left, usage, echoed, firsts = len(handles), {"prompt_tokens": 0, "completion_tokens": 0}, set(), set()
        timers = [self.metrics.request(t_arrival) for _ in handles]

        def events_of(i: int, out) -> tuple[list[str], bool]:
            """One output's SSE events (choice i), and whether it failed (an exception or an error output: then the
            error event alone)."""
            nonlocal left
            if isinstance(out, Exception) or out.finish_reason == "error":
                self.counts["requests_failed"] += 1
                self.metrics.failure.inc()
                msg = str(out) if isinstance(out, Exception) else out.error
                return [sse(ApiError(500, f"generation failed: {msg}", type="server_error").body())], True
            events = []
            timers[i].observe(out)
            if echo is not None and i not in echoed:     # its first output (the prompt's logprobs come with it)
                echoed.add(i)
                head, lp = self.echo_prompt(fmt, i, *echo[i // n], out.prompt_logprobs if echo_logprobs else None)
                events.append(sse(chunk(i, head, None, logprobs=lp)))
            if out.token_ids and i not in firsts and t_arrival is not None:
                firsts.add(i)
                self.latency["first_chunks"] += 1
                self.latency["ttft_s"] += time.perf_counter() - t_arrival
            lps = fmt.piece(i, out.token_ids, out.logprobs) if out.token_ids else None
            deltas = replies[i].deltas(out.text) if chat else [None] * bool(out.text)
            if (lps or (continuous and out.token_ids)) and not deltas:   # with usage: a chunk per step, text or not
                deltas = [None]
            for j, delta in enumerate(deltas):
                ev = chunk(i, out.text, None, delta=delta, logprobs=lps if j == 0 else None)
                if continuous:
                    ev["usage"] = {"prompt_tokens": out.num_prompt_tokens,
                                   "completion_tokens": out.num_generated_tokens,
                                   "total_tokens": out.num_prompt_tokens + out.num_generated_tokens}
                events.append(sse(ev))
            if out.finished:
                left -= 1
                pending.finished(i, out.finish_reason)
                usage["prompt_tokens"] += out.num_prompt_tokens if i % n == 0 else 0   # once a prompt
                usage["completion_tokens"] += out.num_generated_tokens
                reason = out.finish_reason
                if chat:
                    last, reason = replies[i].finish(reason)
                    events += [sse(chunk(i, None, None, delta=delta)) for delta in last]
                events.append(sse(chunk(i, None, reason)))
            return events, False

        arrivals = _arrivals(handles)
        try:
            if chat:
                yield "".join(sse(chunk(i, None, None, first=True)) for i in range(len(handles)))
            async for batch in arrivals:     # what arrived since the last write: its events go out in one write
                events, failed = [], False
                for i, out in batch:
                    more, failed = events_of(i, out)
                    events += more
                    if failed:
                        break
                if not failed and not left:
                    if include_usage:
                        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                        events.append(sse({"id": rid, "object": kind, "created": created, "model": self.model_name,
                                           "choices": [], "usage": usage}))
                    events.append(sse("[DONE]"))
                if events:
                    yield "".join(events)
                if failed or not left:
                    break
        finally:
            pending.cancel()          # what is still running when the stream ends early (client gone, error)
            await arrivals.aclose()

    def echo_prompt(self, fmt: ChoiceLogprobs, i: int, prompt: List[int], text: Optional[str],
             prompt_logprobs: Optional[list]) -> tuple[str, Optional[dict]]:
        """An echoed prompt's text and (when given its entries) its logprobs object, for choice i."""
        head = text if text is not None else self.engine.tokenizer.decode(prompt)
        return head, None if prompt_logprobs is None else fmt.completion(i, prompt, prompt_logprobs)

    async def complete(self, request: Request, chat: bool):
        t_arrival = time.perf_counter()
        req = parse_body(await read_body(request), ChatRequest if chat else CompletionRequest)
        self.check_model(req.model)
        if chat:
            tools.check(req)
        prompts, texts = ([self.chat_prompt(req)], [None]) if chat else self.completion_prompts(req)
        pending = self.submit(prompts, req)
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        echo = list(zip(prompts, texts)) if getattr(req, "echo", False) else None
        echo_logprobs = echo is not None and req.logprobs is not None
        if req.stream:
            so = req.stream_options
            replies = [tools.Reply.for_request(req) for _ in pending.handles] if chat else None
            self.latency["streams"] += 1
            self.latency["submit_s"] += time.perf_counter() - t_arrival
            events = self.stream(pending, rid, created, replies, bool(so and so.include_usage),
                                 bool(so and so.continuous_usage_stats), echo, echo_logprobs, req.n, t_arrival)
            return EngineStream(events, on_disconnect=pending.cancel)
        results = await self.collect(request, pending, t_arrival)
        usage = {"prompt_tokens": sum(r["prompt_tokens"] for r in results[::req.n]),   # once a prompt
                 "completion_tokens": sum(r["completion_tokens"] for r in results)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        fmt = ChoiceLogprobs(self.engine.tokenizer, chat)
        choices = []
        for i, r in enumerate(results):
            head, lp = self.echo_prompt(fmt, i, *echo[i // req.n], r["prompt_logprobs"] if echo_logprobs else None) \
                if echo else ("", None)
            gen = fmt.piece(i, r["token_ids"], r["logprobs"])
            lp = merge(lp, gen) if lp and gen else lp or gen
            if chat:
                msg, reason = tools.Reply.for_request(req).message(r["text"], r["finish_reason"])
                choices.append({"index": i, "message": msg, "finish_reason": reason, "logprobs": lp})
            else:
                choices.append({"index": i, "text": head + r["text"], "finish_reason": r["finish_reason"],
                                "logprobs": lp})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.model_name, "choices": choices, "usage": usage}


# The POST routes read their bodies themselves (parse_body: strict, OpenAI-style errors); their request models go
# into /openapi.json by hand, so clients and fuzzers (tests/test_api_schemathesis.py) see the real bodies.
BODIES = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest, "/v1/responses": ResponsesRequest,
          "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}


def _openapi_with_bodies(app: FastAPI):
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            comps = spec.setdefault("components", {}).setdefault("schemas", {})
            for path, model in BODIES.items():
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[model.__name__] = js
                spec["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            app.openapi_schema = spec
        return app.openapi_schema
    return openapi


def create_app(engine, *, model_name: str, keys: Sequence[str] = (), info: Optional[dict] = None,
               defaults: Optional[dict] = None, aliases: Sequence[str] = (),
               allowed_origins: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app serving `engine` (already started) as `model_name` (the name responses carry; requests may
    also use any of `aliases`). keys: accepted bearer tokens; info: shown by /health, /v1/models and the page;
    defaults: sampling settings a request leaves out; allowed_origins: web origins whose pages may call the API
    (CORS; "*": any; none: same-origin only, the chat page included)."""
    srv = Server(engine, model_name, dict(defaults or {}), dict(info or {}), aliases)
    app = FastAPI(title="llm-pipeline", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    if allowed_origins:   # answers browsers' preflights; the key check still applies to the requests themselves
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.state.server = srv
    keys = [k.encode() for k in keys]

    async def check_key(request: Request) -> None:   # async: a sync dependency would hop to a worker thread
        if not keys:
            return
        auth = request.headers.get("authorization", "")
        if not auth:
            raise ApiError(401, "no API key given: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip().encode(), k) for k in keys):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(ApiError(e.status_code, msg, code="not_found" if e.status_code == 404 else None).body(),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, e: ClientDisconnect):   # left before its body was read: nothing to answer
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name, **srv.info, **srv.engine.stats(), **srv.counts,
                "frontend_latency": dict(srv.latency), "frontend_cpu_s": time.process_time()}

    @app.get("/metrics", include_in_schema=False)
    def metrics():   # Prometheus' text format (metrics.py); like /health, no key (vLLM's is open too)
        body, ctype = srv.metrics.render()
        return Response(body, media_type=ctype)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    def model_object(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "llm-pipeline", **srv.info}

    @v1.get("/models")
    def models():
        return {"object": "list", "data": [model_object(n) for n in srv.names]}

    @v1.get("/models/{model_id:path}")
    def model(model_id: str):
        srv.check_model(model_id)
        return model_object(model_id)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await srv.complete(request, chat=True)

    @v1.post("/completions")
    async def completions(request: Request):
        return await srv.complete(request, chat=False)

    @v1.post("/responses")
    async def responses(request: Request):   # OpenAI's Responses API over the chat path (responses.py)
        return await respond(srv, request)

    app.include_router(v1)
    app.include_router(tokenizer_routes(srv, check_key))   # /tokenize, /detokenize, /tokenizer_info (vLLM's)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.openapi = _openapi_with_bodies(app)
    return app
