"""``tinysft serve``: a run's model behind HTTP, with the standard library only.

    GET  /health                 {"status": "ok", "kind": "classifier" | "chat", "model": NAME}
    POST /v1/classify            classifier runs: {"input": TEXT or [TEXT, ...]}
                                 → {"object": "list", "model": NAME, "data": [{"index", "label", "score",
                                    "scores": {LABEL: PROBABILITY}}, ...]}
    POST /v1/chat/completions    decoders, OpenAI-compatible: {"messages": [{"role", "content"}, ...],
                                 "max_tokens", "temperature", "top_p", "seed", "stream"} → a
                                 "chat.completion" with ``usage`` (prompt, completion and total tokens);
                                 with ``"stream": true`` server-sent events ``data: {chunk}\\n\\n``, each
                                 chunk's text in ``choices[0].delta.content``, ending ``data: [DONE]``
                                 (a last chunk with ``usage`` when ``stream_options.include_usage``)

A ``ThreadingHTTPServer`` gives each connection its own thread; one lock around the
model makes requests take turns at it (a streamed reply holds it until its last token),
so the model never sees two batches at once and a reply is the one it would get alone.

What a request may send is bounded before any of it is read: a body needs a
``Content-Length`` (411 without one) of at most ``max_body`` bytes (413 above it);
bytes that are not UTF-8 JSON, a body that is not an object, or a field that is
missing, of the wrong type or out of range is a 400. Every error is JSON, as the
OpenAI API writes it: ``{"error": {"message", "type", "param", "code"}}``. The
server binds to 127.0.0.1 unless ``host`` says otherwise.
"""
import json
import sys
import threading
import time
import traceback
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from .. import __version__
from .. import rng
from ..data.chat import ROLES, render_chatml
from ..tensor import no_grad
from .config import Setting, Settings
from .output import say

__all__ = ["ClassifierService", "ChatService", "RequestError", "make_server", "load_service", "serve", "SERVE"]

MAX_BODY = 1 << 20        # bytes of one request body
MAX_TEXTS = 256           # texts of one /v1/classify request
MAX_TOKENS = 1024         # the largest max_tokens a chat request may ask for
DEFAULT_MAX_TOKENS = 256  # a chat request's max_tokens when it gives none


class RequestError(Exception):
    """A request the server refuses: the HTTP status, a message and the field (``param``) at fault."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


# --------------------------------------------------------------------------- the models

class ClassifierService:
    """A sequence classifier (a finished ``tinysft finetune`` run): texts → label probabilities."""

    kind = "classifier"

    def __init__(self, model, tokenizer, label_names, max_length: int, name: str):
        self.model, self.tokenizer, self.max_length, self.name = model.eval(), tokenizer, max_length, name
        self.label_names = list(label_names)
        self.lock = threading.Lock()
        self.routes = {"/v1/classify": self.classify_request}

    @classmethod
    def from_run(cls, run_dir) -> "ClassifierService":
        from .run_folder import load_run
        config, info, model, tokenizer = load_run(run_dir)
        return cls(model, tokenizer, info["label_names"], config.max_length, str(run_dir))

    def probabilities(self, texts) -> np.ndarray:
        """(len(texts), num_labels) softmax probabilities, texts truncated to ``max_length`` tokens."""
        encoded = self.tokenizer.encode_batch(list(texts), max_length=self.max_length, padding=True,
                                              truncation=True)
        with self.lock, no_grad():
            return self.model(encoded["input_ids"], encoded["attention_mask"]).softmax(-1).numpy()

    def classify_request(self, body: dict, handler):
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise RequestError(400, "'input' must be a text or a non-empty list of texts", "input")
        if len(texts) > MAX_TEXTS:
            raise RequestError(400, f"'input' holds {len(texts)} texts; at most {MAX_TEXTS} per request", "input")
        probs = self.probabilities(texts)
        data = [{"index": i, "label": self.label_names[int(row.argmax())], "score": float(row.max()),
                 "scores": dict(zip(self.label_names, map(float, row)))} for i, row in enumerate(probs)]
        return {"object": "list", "model": self.name, "data": data}


class ChatService:
    """A causal decoder with the ChatML template: messages → the assistant's reply."""

    kind = "chat"

    def __init__(self, model, tokenizer, name: str, max_tokens: int = MAX_TOKENS):
        from ..models.generation import default_stop_ids
        self.model, self.tokenizer, self.name, self.max_tokens = model.eval(), tokenizer, name, max_tokens
        self.stop_ids = default_stop_ids(model, tokenizer)
        self.lock = threading.Lock()
        self.routes = {"/v1/chat/completions": self.chat_request}

    @classmethod
    def from_model(cls, model="auto", tokenizer="auto") -> "ChatService":
        """The decoder and tokenizer that ``tinysft generate`` finds for ``--model`` / ``--tokenizer``."""
        from .generate import load_decoder
        decoder, bpe = load_decoder(model, tokenizer)
        return cls(decoder, bpe, Path(decoder.name_or_path).name)

    def prompt(self, messages, max_tokens: int) -> list:
        """The token ids of ``messages`` in the chat template, ending with the assistant's header;
        RequestError if the reply of ``max_tokens`` would not fit in the model's context."""
        prompt = self.tokenizer.encode(render_chatml(messages, add_generation_prompt=True))
        room = self.model.config.max_position_embeddings - len(prompt)
        if max_tokens > room:
            raise RequestError(400, f"the prompt has {len(prompt)} tokens, so max_tokens can be at most {room} "
                                    f"(context {self.model.config.max_position_embeddings})", "max_tokens")
        return prompt

    def complete(self, prompt, max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 generator=None, stream=None) -> dict:
        """The reply to ``prompt`` (token ids): {"text", "finish_reason" ("stop" at an end-of-turn
        token, "length" at max_tokens), "prompt_tokens", "completion_tokens"}; ``stream(piece)`` gets
        the reply's text as it is decoded."""
        from ..models.generation import generate
        with self.lock:
            new = generate(self.model, [prompt], max_tokens, temperature=temperature, top_p=top_p,
                           generator=generator or rng.generator(), stop_ids=self.stop_ids,
                           tokenizer=self.tokenizer if stream else None, stream=stream)[0]
        stopped = bool(new) and new[-1] in self.stop_ids
        return {"text": self.tokenizer.decode(new[:-1] if stopped else new),
                "finish_reason": "stop" if stopped else "length",
                "prompt_tokens": len(prompt), "completion_tokens": len(new)}

    def chat_request(self, body: dict, handler):
        options = chat_options(body, self.max_tokens)
        settings = options["generate"]
        settings["prompt"] = self.prompt(settings.pop("messages"), settings["max_tokens"])
        reply_id, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

        def chunk(delta, finish_reason=None):
            return {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": self.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

        if not options["stream"]:
            result = self.complete(**settings)
            return {"id": reply_id, "object": "chat.completion", "created": created, "model": self.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                                 "finish_reason": result["finish_reason"]}],
                    "usage": usage(result)}
        events = handler.start_events()
        events(chunk({"role": "assistant", "content": ""}))
        result = self.complete(**settings, stream=lambda piece: events(chunk({"content": piece})))
        events(chunk({}, result["finish_reason"]))
        if options["include_usage"]:
            events({**chunk({}), "choices": [], "usage": usage(result)})
        events("[DONE]")
        return None


def usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


def chat_options(body: dict, max_tokens_limit: int) -> dict:
    """The fields of a chat-completion request that the server reads, each checked (RequestError 400
    naming the field); fields it does not read (``model``, ``user``, ...) are ignored."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    messages = [_message(i, m) for i, m in enumerate(messages)]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_limit) if max_tokens is None else max_tokens
    _check_number("max_tokens", max_tokens, int, 1, max_tokens_limit)
    temperature = body.get("temperature", 1.0)
    _check_number("temperature", 1.0 if temperature is None else temperature, float, 0, 2)
    top_p = body.get("top_p", 1.0)
    _check_number("top_p", 1.0 if top_p is None else top_p, float, 0, 1, low_open=True)
    if body.get("n", 1) not in (1, None):
        raise RequestError(400, "'n' must be 1: one reply per request", "n")
    if body.get("stop") not in (None, [], ""):
        raise RequestError(400, "'stop' sequences are not supported: replies end at the end-of-turn token", "stop")
    seed = body.get("seed")
    if seed is not None:
        _check_number("seed", seed, int, 0, 2**63 - 1)
    stream, stream_options = body.get("stream", False), body.get("stream_options") or {}
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError(400, "'stream' must be true or false", "stream")
    if not isinstance(stream_options, dict) or not isinstance(stream_options.get("include_usage", False), bool):
        raise RequestError(400, "'stream_options' must be an object with a true/false 'include_usage'",
                           "stream_options")
    return {"stream": bool(stream), "include_usage": stream_options.get("include_usage", False),
            "generate": {"messages": messages, "max_tokens": max_tokens,
                         "temperature": float(1.0 if temperature is None else temperature),
                         "top_p": float(1.0 if top_p is None else top_p),
                         "generator": None if seed is None else np.random.default_rng(seed)}}


def _message(i: int, message) -> dict:
    """``{"role", "content"}``; content given as a list of ``{"type": "text", "text"}`` parts is joined."""
    where = f"messages[{i}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RequestError(400, f"{where} must be an object with a role in {', '.join(ROLES)}", where)
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(400, f"{where}.content must be a text (or a list of text parts)", where)
    return {"role": message["role"], "content": content}


def _check_number(name: str, value, kind, low, high, low_open: bool = False) -> None:
    is_kind = (isinstance(value, int) if kind is int else isinstance(value, (int, float))) and not isinstance(value, bool)
    if not is_kind or not (low < value <= high if low_open else low <= value <= high):
        noun = "an integer" if kind is int else "a number"
        raise RequestError(400, f"'{name}' must be {noun} in {'(' if low_open else '['}{low}, {high}], "
                                f"got {json.dumps(value)}", name)


# --------------------------------------------------------------------------- HTTP

class Handler(BaseHTTPRequestHandler):
    """One request: route it, read and check its body, answer in JSON (or server-sent events)."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client's requests reuse one connection
    server_version = f"tinysft/{__version__}"
    timeout = 60  # seconds a silent client may hold its connection
    disable_nagle_algorithm = True  # TCP_NODELAY: headers and body (and each event) leave at once, with no
    # 40 ms wait for the client's delayed ACK between them

    def do_GET(self):
        path = urlsplit(self.path).path
        service = self.server.service
        if path == "/health":
            self.send_json(200, {"status": "ok", "kind": service.kind, "model": service.name})
        elif path in service.routes:
            self.send_error_json(RequestError(405, f"{path} takes POST"))
        else:
            self.send_error_json(RequestError(404, f"no such endpoint: GET {path} (try GET /health)"))

    def do_POST(self):
        path = urlsplit(self.path).path
        route = self.server.service.routes.get(path)
        try:
            if route is None:
                known = ", ".join(["GET /health", *("POST " + p for p in self.server.service.routes)])
                raise RequestError(405 if path == "/health" else 404, f"no such endpoint: POST {path} ({known})")
            body = self.read_json()
            answer = route(body, self)
        except RequestError as error:
            if getattr(self, "_events_started", False):
                self._event({"error": {"message": error.message, "type": "invalid_request_error"}})
            else:
                self.send_error_json(error)
            return
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        except Exception as error:  # a fault of the server, not of the request: 500, traceback to the log
            traceback.print_exc(file=sys.stderr)
            if getattr(self, "_events_started", False):
                self._event({"error": {"message": f"internal error: {error}", "type": "server_error"}})
                self.close_connection = True
            else:
                self.send_error_json(RequestError(500, f"internal error: {type(error).__name__}: {error}"))
            return
        if answer is not None:
            self.send_json(200, answer)

    def do_PUT(self):
        self.send_error_json(RequestError(405, f"{self.command} is not supported"))

    do_DELETE = do_PATCH = do_PUT

    def too_large(self, length: int) -> RequestError:
        return RequestError(413, f"the body has {length} bytes; at most {self.server.max_body}")

    def handle_expect_100(self):
        """``Expect: 100-continue`` with a Content-Length over the bound: 413 at once, before the client
        sends the body (a plain 100 Continue otherwise)."""
        length = self.headers.get("Content-Length", "")
        if length.strip().isdigit() and int(length) > self.server.max_body:
            self.close_connection = True
            self.send_error_json(self.too_large(int(length)))
            return False
        return super().handle_expect_100()

    def read_json(self) -> dict:
        """The body as a JSON object, read only when its declared size is within ``max_body``."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(411, "a chunked body is not accepted: send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(411, "a request body needs a Content-Length header")
        if not length.strip().isdigit():
            self.close_connection = True
            raise RequestError(400, f"Content-Length {length!r} is not a number of bytes")
        length = int(length)
        if length > self.server.max_body:
            self.close_connection = True  # the body stays unread: this connection cannot carry another request
            raise self.too_large(length)
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            raise RequestError(400, f"the body ended after {len(data)} of {length} bytes")
        try:
            body = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise RequestError(400, f"the body is not UTF-8 JSON: {error}") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def send_json(self, status: int, value) -> None:
        data = json.dumps(value, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, error: RequestError) -> None:
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        self.send_json(error.status, {"error": {"message": error.message, "type": kind, "param": error.param,
                                                "code": HTTPStatus(error.status).phrase.lower().replace(" ", "_")}})

    def start_events(self):
        """Send the headers of a server-sent event stream; return the function that sends one event
        (a JSON value, or the text ``[DONE]``). The stream ends with the connection."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self._events_started = True
        return self._event

    def _event(self, value) -> None:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        self.wfile.write(f"data: {text}\n\n".encode("utf-8"))
        self.wfile.flush()

    def log_message(self, format, *args):
        if self.server.log:
            super().log_message(format, *args)


def make_server(service, host: str = "127.0.0.1", port: int = 8000, max_body: int = MAX_BODY,
                log: bool = True) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer for ``service`` (port 0: a free one, in ``server.server_port``); call
    ``serve_forever()`` on it (``shutdown()`` from another thread stops it)."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.service, server.max_body, server.log = service, max_body, log
    return server


def load_service(run_dir=None, model="auto", tokenizer="auto"):
    """A ClassifierService for a ``tinysft finetune`` run folder (its run.json names labels); else a
    ChatService for the decoder in ``run_dir`` (an SFT run's export) or, without one, ``model``."""
    if run_dir is not None and model != "auto":
        raise ValueError("give a run folder or --model, not both")
    if run_dir is not None and _is_classifier_run(Path(run_dir)):
        return ClassifierService.from_run(run_dir)
    return ChatService.from_model(model if run_dir is None else run_dir, tokenizer)


def _is_classifier_run(run_dir: Path) -> bool:
    from .files import read_json
    from .run_folder import INFO
    return (run_dir / INFO).is_file() and "label_names" in read_json(run_dir / INFO)


SERVE = Settings("serve", [
    Setting("model", str, "auto", "the decoder to serve when no run folder is given: a .gguf file, a folder "
                                  "with config.json + model.safetensors, or 'auto' (SmolLM2-135M-Instruct)"),
    Setting("tokenizer", str, "auto", "a decoder's tokenizer (a .gguf file), or 'auto' (the model's own)"),
    Setting("host", str, "127.0.0.1", "address to listen on (0.0.0.0: every network interface)"),
    Setting("port", int, 8000, "TCP port", minimum=0, maximum=65535, zero="any free port"),
    Setting("max_body", int, MAX_BODY, "largest request body in bytes (larger: 413)", minimum=1),
    Setting("max_tokens", int, MAX_TOKENS, "largest max_tokens a chat request may ask for", minimum=1),
    Setting("log", bool, True, "one line per request on stderr"),
])


def serve(run_dir, config) -> int:
    """Serve ``run_dir`` (or ``config.model``) until interrupted (Ctrl-C)."""
    service = load_service(run_dir, config.model, config.tokenizer)
    if service.kind == "chat":
        service.max_tokens = config.max_tokens
    server = make_server(service, config.host, config.port, config.max_body, config.log)
    endpoints = ", ".join(["GET /health", *("POST " + p for p in service.routes)])
    say(f"serving {service.kind} {service.name} on http://{config.host}:{server.server_port} ({endpoints}); "
        "Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
