"""`folovllm serve MODEL`: an OpenAI-compatible HTTP server over AsyncLLM (FastAPI + uvicorn).

    GET  /v1/models              the one served model
    POST /v1/completions         text or token-id prompts (a batch: one choice per prompt)
    POST /v1/chat/completions    messages through the tokenizer's chat template (or --chat-template)
    GET  /health (200, or 503 once the engine is dead)  GET /metrics   open even with --api-key (Prometheus text, vLLM's names: metrics.py)
    POST /tokenize  POST /detokenize

Streaming is server-sent events ending in `data: [DONE]`. Each prompt of a request is one engine
request (`cmpl-<uuid>-<i>`); every request's first output is awaited before the response starts,
so bad input is a 400 (the engine's ValueError message), never a broken stream. A client that
goes away aborts its engine requests, streaming or not. Errors use OpenAI's body:
{"error": {"message", "type", "param", "code"}}.

Beside it: protocol.py (the bodies), errors.py (the error body; the guard that answers 401 and
413 before FastAPI parses anything), engine_requests.py (running, streaming and aborting the
engine requests of one HTTP request), metrics.py (/metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from folovllm.engine.async_llm import EngineDeadError
from folovllm.entrypoints.chat_utils import apply_chat_template
from folovllm.entrypoints.openai import protocol as p
from folovllm.entrypoints.openai import DEFAULT_MAX_BODY_BYTES
from folovllm.entrypoints.openai.engine_requests import EngineRequests
from folovllm.entrypoints.openai.errors import (APIError, Guard, bad_value, error_body, error_response,
                                               validation_message)
from folovllm.entrypoints.openai.metrics import ServerMetrics
from folovllm.logger import init_logger
from folovllm.sampling_params import SamplingParams

logger = init_logger(__name__)

_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "seed", "stop", "stop_token_ids", "best_of")


# ---- the app -------------------------------------------------------------------------------------

def build_app(engine, served_model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, chat_template: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (an AsyncLLM) as `served_model_name`. Callbacks in
    app.state.on_shutdown run when the server stops; app.state.abort_all() cancels what is in
    flight (run_server calls it on Ctrl-C / SIGTERM)."""
    metrics = ServerMetrics(engine, served_model_name)
    runs = EngineRequests(engine, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop = asyncio.get_running_loop()
        yield
        app.state.abort_all()
        for callback in app.state.on_shutdown:
            callback()

    app = FastAPI(title="FoloVLLM OpenAI-compatible server", lifespan=lifespan)
    app.state.on_shutdown = []
    app.state.shutting_down = False
    app.state.metrics = metrics

    def abort_all() -> None:
        app.state.shutting_down = True
        runs.abort_all()

    app.state.abort_all = abort_all

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        return error_response(400, *validation_message(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal_error(_, e: Exception):
        logger.exception("unhandled error in a request")
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    tokenizer = engine.tokenizer
    vocab_size = engine.model_config.vocab_size

    async def parse(request: Request, model: type[BaseModel]):
        body = await request.body()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(400, f"the request body is not valid UTF-8: {e}") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(obj).__name__}")
        try:
            req = model.model_validate(obj)
        except ValidationError as e:
            raise APIError(400, *validation_message(e.errors())) from None
        if getattr(req, "model", None) not in (None, served_model_name):
            raise APIError(404, f"the model `{req.model}` does not exist; this server serves "
                                f"`{served_model_name}`", param="model", code="model_not_found")
        if app.state.shutting_down:
            raise APIError(503, "the server is shutting down")
        return req

    def token_text(tid: int) -> str:
        return tokenizer.decode([tid]) if tokenizer is not None else f"token_id:{tid}"

    def chat_ids(messages, add_generation_prompt: bool, kwargs: dict | None) -> list[int]:
        kwargs = dict(kwargs or {})
        template = kwargs.pop("chat_template", None) or chat_template
        for reserved in ("tokenize", "add_generation_prompt", "conversation"):
            kwargs.pop(reserved, None)
        conversation = [m.model_dump(exclude_none=True) for m in messages]
        try:
            return apply_chat_template(tokenizer, conversation, add_generation_prompt=add_generation_prompt,
                                       chat_template=template, **kwargs)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    def sampling_params(req, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        kw = {k: getattr(req, k) for k in _SAMPLING_KEYS if getattr(req, k) is not None}
        try:
            return SamplingParams(n=req.n, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                                  max_tokens=max_tokens, logprobs=logprobs, **kw)
        except ValueError as e:
            raise bad_value(e) from None

    def usage_of(finals) -> p.UsageInfo:
        prompt = sum(len(o.prompt_token_ids) for o in finals)
        completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
        return p.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def ids_of(req, prompt_ids, token_ids) -> dict:
        """The token-id fields of a choice when the request asked for them (return_token_ids)."""
        if not req.return_token_ids:
            return {}
        return dict(prompt_token_ids=None if prompt_ids is None else list(prompt_ids), token_ids=list(token_ids))

    def sse(obj: BaseModel) -> str:
        return f"data: {obj.model_dump_json()}\n\n"

    def sse_error(e: BaseException) -> str:
        status, msg = (e.status, e.message) if isinstance(e, APIError) else (500, f"{type(e).__name__}: {e}")
        return f"data: {json.dumps(error_body(status, msg, code=status))}\n\n"

    # ---- logprobs in OpenAI's two shapes ----

    def completion_logprobs(token_ids, logprobs, offset: int) -> p.CompletionLogprobs:
        lp = p.CompletionLogprobs()
        for tid, entry in zip(token_ids, logprobs):
            text = token_text(tid)
            lp.tokens.append(text)
            lp.token_logprobs.append(entry.get(tid))
            lp.top_logprobs.append({token_text(t): v for t, v in sorted(entry.items(), key=lambda kv: -kv[1])})
            lp.text_offset.append(offset)
            offset += len(text)
        return lp

    def chat_logprobs(token_ids, logprobs, top_n: int) -> p.ChatLogprobs:
        content = []
        for tid, entry in zip(token_ids, logprobs):
            text = token_text(tid)
            top = [p.TopLogprob(token=token_text(t), logprob=v, bytes=list(token_text(t).encode()))
                   for t, v in sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]]
            content.append(p.ChatTokenLogprob(token=text, logprob=entry.get(tid, float("-inf")),
                                              bytes=list(text.encode()), top_logprobs=top))
        return p.ChatLogprobs(content=content)

    # ---- endpoints ----

    @app.get("/health")
    async def health():
        # vLLM's contract: 200 while the engine can serve, 503 once it cannot (a load balancer
        # or supervisor then takes this server out and restarts it).
        try:
            engine.check_health()
        except EngineDeadError as e:
            return Response(str(e), status_code=503, media_type="text/plain")
        return Response(status_code=200)

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        card = p.ModelCard(id=served_model_name, max_model_len=engine.model_config.max_model_len)
        return p.ModelList(data=[card]).model_dump()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await parse(request, p.TokenizeRequest)
        if req.messages is not None:
            ids = chat_ids(req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        elif req.prompt is not None:
            try:
                ids = engine.encode(req.prompt)
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
        else:
            raise APIError(400, "give 'prompt' (text) or 'messages' (a conversation)", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.model_config.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await parse(request, p.DetokenizeRequest)
        if tokenizer is None:
            raise APIError(400, "this model was loaded without a tokenizer, so it cannot detokenize")
        bad = next((t for t in req.tokens if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab_size})", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, p.CompletionRequest)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported (no prompt logprobs)", param="echo")
        params = sampling_params(req, req.max_tokens, req.logprobs)
        inputs = [x if isinstance(x, str) else {"prompt_token_ids": x} for x in prompts]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        started = await runs.start(inputs, params, request_id)

        def echo_text(out) -> str:
            if out.prompt is not None:
                return out.prompt
            return tokenizer.decode(out.prompt_token_ids) if tokenizer is not None else ""

        if not req.stream:
            finals = await runs.final_outputs(request, started)
            choices = []
            for i, out in enumerate(finals):
                for c in out.outputs:  # n of them per prompt: choice i * n + c.index, as OpenAI
                    prefix = echo_text(out) if req.echo else ""
                    lp = None if c.logprobs is None else completion_logprobs(c.token_ids, c.logprobs, 0)
                    choices.append(p.CompletionChoice(index=i * req.n + c.index, text=prefix + c.text, logprobs=lp,
                                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                                      **ids_of(req, out.prompt_token_ids, c.token_ids)))
            return p.CompletionResponse(id=request_id, created=created, model=served_model_name,
                                        choices=choices, usage=usage_of(finals)).model_dump()

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def stream():
            num = len(started) * req.n  # choice k = prompt i * n + sequence j
            sent_text, sent_tokens, offsets = [0] * num, [0] * num, [0] * num
            done = [False] * num
            finals = [None] * len(started)
            try:
                async for i, out in runs.outputs(started):
                    if out.finished:
                        finals[i] = out
                    for c in out.outputs:
                        k = i * req.n + c.index
                        if done[k]:
                            continue
                        text = c.text[sent_text[k]:]
                        if req.echo and sent_tokens[k] == 0 and sent_text[k] == 0:
                            text = echo_text(out) + text
                        new_ids = c.token_ids[sent_tokens[k]:]
                        first = sent_tokens[k] == 0
                        lp = None
                        if c.logprobs is not None:
                            lp = completion_logprobs(new_ids, c.logprobs[sent_tokens[k]:], offsets[k])
                            offsets[k] += sum(len(t) for t in lp.tokens)
                        sent_text[k], sent_tokens[k] = len(c.text), len(c.token_ids)
                        ended = c.finish_reason is not None
                        done[k] = ended
                        if not text and not ended and not new_ids:
                            continue
                        choice = p.CompletionChoice(index=k, text=text, logprobs=lp,
                                                    finish_reason=c.finish_reason if ended else None,
                                                    stop_reason=c.stop_reason if ended else None,
                                                    **ids_of(req, out.prompt_token_ids if first else None, new_ids))
                        yield sse(p.CompletionResponse(id=request_id, created=created, model=served_model_name,
                                                       choices=[choice]))
                if include_usage:
                    yield sse(p.CompletionResponse(id=request_id, created=created, model=served_model_name,
                                                   choices=[], usage=usage_of(finals)))
                yield "data: [DONE]\n\n"
            except Exception as e:  # noqa: BLE001  headers are sent: report it in the stream
                yield sse_error(e)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, p.ChatCompletionRequest)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
        top_n = req.top_logprobs or 0
        ids = chat_ids(req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling_params(req, max_tokens, top_n if req.logprobs else None)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        started = await runs.start([{"prompt_token_ids": ids}], params, request_id)

        if not req.stream:
            finals = await runs.final_outputs(request, started)
            choices = []
            for c in finals[0].outputs:
                lp = None if c.logprobs is None else chat_logprobs(c.token_ids, c.logprobs, top_n)
                choices.append(p.ChatCompletionChoice(
                    index=c.index, message=p.ChatResponseMessage(content=c.text), logprobs=lp,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    **ids_of(req, finals[0].prompt_token_ids, c.token_ids)))
            return p.ChatCompletionResponse(id=request_id, created=created, model=served_model_name,
                                            choices=choices, usage=usage_of(finals)).model_dump()

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, usage=None) -> str:
            return sse(p.ChatCompletionChunk(id=request_id, created=created, model=served_model_name,
                                             choices=choices, usage=usage))

        async def stream():
            sent_text, sent_tokens, done = [0] * req.n, [0] * req.n, [False] * req.n
            final = None
            try:
                for j in range(req.n):
                    yield chunk([p.ChatStreamChoice(index=j, delta=p.DeltaMessage(role="assistant", content=""))])
                async for _, out in runs.outputs(started):
                    if out.finished:
                        final = out
                    for c in out.outputs:
                        j = c.index
                        if done[j]:
                            continue
                        text, new_ids = c.text[sent_text[j]:], c.token_ids[sent_tokens[j]:]
                        first = sent_tokens[j] == 0
                        lp = None if c.logprobs is None else chat_logprobs(new_ids, c.logprobs[sent_tokens[j]:],
                                                                           top_n)
                        sent_text[j], sent_tokens[j] = len(c.text), len(c.token_ids)
                        ended = c.finish_reason is not None
                        done[j] = ended
                        if not text and not ended and not new_ids:
                            continue
                        yield chunk([p.ChatStreamChoice(index=j, delta=p.DeltaMessage(content=text), logprobs=lp,
                                                        finish_reason=c.finish_reason if ended else None,
                                                        stop_reason=c.stop_reason if ended else None,
                                                        **ids_of(req, out.prompt_token_ids if first else None,
                                                                 new_ids))])
                if include_usage:
                    yield chunk([], usage_of([final]))
                yield "data: [DONE]\n\n"
            except Exception as e:  # noqa: BLE001
                yield sse_error(e)

        return StreamingResponse(stream(), media_type="text/event-stream")

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


# ---- the command --------------------------------------------------------------------------------

# The server's step budget with chunked prefill when none is given (offline engines keep 8192):
# on the chunked workload (H200, docs/chunked_prefill.md) it kept the streams' worst gap next to
# 8k-token prompts at 10 ms (42 ms with whole prompts, 16 ms at 2048) for 1.5x those prompts'
# first-token time.
SERVER_MAX_NUM_BATCHED_TOKENS = 1024


def apply_server_defaults(args: argparse.Namespace) -> None:
    """Settings whose best value differs for a server: the chunked-prefill token budget. Not as
    rank 0 of ranks started by hand (FOLOVLLM_DISTRIBUTED=env): every rank must run with the same
    budget, and a `folovllm worker` given the same flags cannot know that its rank 0 is a server,
    so there the engine's default stands unless --max-num-batched-tokens is given."""
    if os.environ.get("FOLOVLLM_DISTRIBUTED", "") == "env":
        return
    if getattr(args, "max_num_batched_tokens", None) is None and getattr(args, "enable_chunked_prefill", True):
        args.max_num_batched_tokens = SERVER_MAX_NUM_BATCHED_TOKENS


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    from folovllm.engine.arg_utils import from_cli_args
    from folovllm.engine.async_llm import AsyncLLM

    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    apply_server_defaults(args)
    chat_template = args.chat_template
    if chat_template and os.path.isfile(chat_template):
        with open(chat_template) as f:
            chat_template = f.read()
    engine = AsyncLLM.from_engine_args(from_cli_args(args), engine_core=args.engine_core)
    app = build_app(engine, args.served_model_name or args.model, api_key=args.api_key,
                    max_body_bytes=args.max_request_body_bytes, chat_template=chat_template)
    app.state.on_shutdown.append(engine.shutdown)
    from folovllm.engine.core import freeze_startup_heap
    freeze_startup_heap()  # the server's process serves for long too (see the engine-core process)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Stop accepting, and abort what is running now rather than wait for it to finish.
            super().handle_exit(sig, frame)
            loop = getattr(app.state, "loop", None)
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(app.state.abort_all)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=3)
    logger.info("serving %s on http://%s:%d/v1", args.served_model_name or args.model, args.host, args.port)
    try:
        Server(config).run()  # re-raises the signal that stopped it, once it has shut down
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()
    return 0
