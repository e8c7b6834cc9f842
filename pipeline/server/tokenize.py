"""The tokenizer endpoints, as vLLM serves them (lm-eval's `local-completions` probes them to tokenize on the
server: its "remote" tokenizer backend):

    POST /tokenize        {"prompt": "text", "add_special_tokens": true}  or  {"messages": [...]}   (chat template
                          with the assistant's turn opened, as /v1/chat/completions feeds the model)
                          -> {"count", "max_model_len", "tokens", "token_strs"}   ("return_token_strs": true: strings)
    POST /detokenize      {"tokens": [ids]} -> {"prompt": "text"}
    GET  /tokenizer_info  -> {"tokenizer_class", "bos_token", "eos_token", "pad_token", "unk_token",
                              "model_max_length", "vocab_size", "chat_template"}

They take the API key like /v1 (lm-eval: `auth_token`); `model`, when given, must be the served model.
"""
from __future__ import annotations

from typing import Callable, List, Literal, Optional, Union

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from .schemas import ApiError, ChatMessage, NamedToolChoice, Tool, _Strict, parse_body


class TokenizeRequest(_Strict):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = Field(None, min_length=1)
    tools: Optional[List[Tool]] = None      # with messages: rendered as the chat endpoint renders them
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    add_special_tokens: bool = True
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "give either 'prompt' (text) or 'messages' (a chat)", param="prompt")


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: List[int]

    def check(self) -> None:
        pass


def model_vocab(engine) -> int:
    """The model's vocabulary size: an EngineClient has it from the core's ready message, an Engine from its model."""
    info = getattr(engine, "info", None)
    return info["vocab_size"] if info else engine.runner.args.vocab_size


def tokenizer_routes(srv, check_key: Callable) -> APIRouter:
    """The three routes over `srv` (app.Server: its engine's tokenizer, model name and session_len)."""
    router = APIRouter(dependencies=[Depends(check_key)])

    def tokenizer(model: Optional[str] = None):
        if model is not None:
            srv.check_model(model)
        if srv.engine.tokenizer is None:
            raise ApiError(404, "this workspace has no tokenizer (triton_models/tokenizer is missing)",
                           code="not_found")
        return srv.engine.tokenizer

    @router.post("/tokenize")
    async def tokenize(request: Request):
        req = parse_body(await request.body(), TokenizeRequest)
        tok = tokenizer(req.model)
        if req.messages is not None:
            ids = srv.chat_prompt(req)
        else:
            ids = list(tok(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": srv.session_len, "tokens": ids, "token_strs": strs}

    @router.post("/detokenize")
    async def detokenize(request: Request):
        req = parse_body(await request.body(), DetokenizeRequest)
        tok = tokenizer(req.model)
        vocab = max(len(tok), model_vocab(srv.engine))      # ids the model may emit past the tokenizer decode to ""
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token ids must be in [0, {vocab}), got {bad[:5]}", param="tokens")
        return {"prompt": tok.decode(req.tokens)}

    @router.get("/tokenizer_info")
    def tokenizer_info():
        tok = tokenizer()
        info = {"tokenizer_class": type(tok).__name__}
        info.update({name: getattr(tok, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")})
        info.update(model_max_length=srv.session_len, vocab_size=len(tok), chat_template=tok.chat_template)
        return info

    return router
