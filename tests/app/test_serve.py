"""``tinysft serve``: real HTTP requests against a server on a free loopback port.

The models are tiny and random (a 1-layer BERT classifier, a 2-layer Llama over a byte-level
vocabulary with ChatML's two control tokens), so each request takes milliseconds; what is
checked is the protocol: routes, the OpenAI wire format (plain and streamed), usage counts,
concurrent clients, and the refusal of bad or oversize requests.
"""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import tinysft
from tinysft.app.serve import ChatService, ClassifierService, make_server
from tinysft.data import WordPieceTokenizer
from tinysft.data.bpe import BPETokenizer, bytes_to_unicode
from tinysft.data.chat import render_chatml
from tinysft.models import BertConfig, BertForSequenceClassification, generate
from tinysft.models.llama import LlamaConfig, LlamaForCausalLM

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "cat", "dog", "happy", "sad", "feeling"]
LABELS = ["animal", "feeling", "thing"]
BYTES = list(bytes_to_unicode().values())
IM_START, IM_END = len(BYTES), len(BYTES) + 1


def byte_tokenizer():
    """Every byte a token, no merges, and ChatML's <|im_start|> / <|im_end|> as control tokens."""
    return BPETokenizer(BYTES + ["<|im_start|>", "<|im_end|>"], [], [1] * len(BYTES) + [3, 3], eos_id=IM_END)


@pytest.fixture(scope="module")
def classifier():
    tinysft.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16)
    model = BertForSequenceClassification(config, num_labels=len(LABELS))
    return ClassifierService(model, WordPieceTokenizer(VOCAB), LABELS, max_length=16, name="tiny-classifier")


@pytest.fixture(scope="module")
def chat():
    config = LlamaConfig(vocab_size=len(BYTES) + 2, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=IM_END)
    model = LlamaForCausalLM(config, generator=np.random.default_rng(1)).eval()
    return ChatService(model, byte_tokenizer(), name="tiny-chat", max_tokens=64)


MAX_BODY = 16384


def start(service, max_body=MAX_BODY):
    server = make_server(service, "127.0.0.1", 0, max_body=max_body, log=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


def serving(service):
    """The server of ``service`` for a fixture's lifetime, shut down after."""
    server = start(service)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def classifier_server(classifier):
    yield from serving(classifier)


@pytest.fixture(scope="module")
def chat_server(chat):
    yield from serving(chat)


def request(server, method, path, body=None, headers=None, raw=None):
    """(status, headers, body bytes) of one request on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


def post(server, path, body=None, **kwargs):
    status, headers, data = request(server, "POST", path, body, **kwargs)
    return status, json.loads(data)


def events(data: bytes) -> list:
    """The ``data:`` payloads of a server-sent event stream, in order; each event ends in a blank line."""
    text = data.decode("utf-8")
    assert text.endswith("\n\n")
    payloads = []
    for event in text[:-2].split("\n\n"):
        assert event.startswith("data: "), event
        payloads.append(event[len("data: "):])
    return payloads


# ----------------------------------------------------------------------- classifier

def test_health(classifier_server, chat_server):
    for server, kind, name in ((classifier_server, "classifier", "tiny-classifier"), (chat_server, "chat", "tiny-chat")):
        status, headers, data = request(server, "GET", "/health")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(data) == {"status": "ok", "kind": kind, "model": name}


def test_classify_gives_the_models_probabilities(classifier_server, classifier):
    texts = ["a happy cat", "the sad dog feeling", "zebra"]
    status, answer = post(classifier_server, "/v1/classify", {"input": texts})
    assert status == 200 and answer["object"] == "list" and answer["model"] == "tiny-classifier"
    encoded = classifier.tokenizer.encode_batch(texts, max_length=16)
    with tinysft.no_grad():
        logits = classifier.model(encoded["input_ids"], encoded["attention_mask"]).numpy().astype(np.float64)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    assert [row["index"] for row in answer["data"]] == [0, 1, 2]
    for row, p in zip(answer["data"], want):
        got = np.array([row["scores"][name] for name in LABELS])
        np.testing.assert_allclose(got, p, rtol=1e-5)
        assert row["label"] == LABELS[int(p.argmax())] and row["score"] == pytest.approx(p.max(), rel=1e-5)
    status, one = post(classifier_server, "/v1/classify", {"input": "a happy cat"})
    assert status == 200 and one["data"][0]["scores"] == pytest.approx(answer["data"][0]["scores"], rel=1e-5)


def test_concurrent_clients_each_get_their_own_answer(classifier_server):
    texts = [" ".join(VOCAB[5 + (i * 7 + j) % 7] for j in range(1 + i % 5)) for i in range(24)]
    alone = [post(classifier_server, "/v1/classify", {"input": t})[1]["data"][0] for t in texts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda t: post(classifier_server, "/v1/classify", {"input": t}), texts))
    for (status, answer), want in zip(together, alone):
        assert status == 200
        assert answer["data"][0]["label"] == want["label"]
        assert answer["data"][0]["scores"] == pytest.approx(want["scores"], rel=1e-5)


def test_keep_alive_serves_several_requests_on_one_connection(classifier_server):
    connection = http.client.HTTPConnection("127.0.0.1", classifier_server.server_port, timeout=30)
    for text in ("a cat", "the dog", "sad"):
        connection.request("POST", "/v1/classify", body=json.dumps({"input": text}))
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["data"][0]["label"] in LABELS
    connection.close()


@pytest.mark.parametrize("raw, fragment", [
    (b"{not json", "not UTF-8 JSON"),
    (b"\xff\xfe{}", "not UTF-8 JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"[" * 5000 + b"]" * 5000, "JSON"),
    (b"{}", "'input'"),
    (b'{"input": []}', "'input'"),
    (b'{"input": ["a", 3]}', "'input'"),
    (b'{"input": ' + json.dumps(["a"] * 300).encode() + b"}", "at most 256"),
])
def test_bad_classify_requests_are_400_with_a_json_error(classifier_server, raw, fragment):
    status, answer = post(classifier_server, "/v1/classify", raw=raw)
    assert status == 400 and fragment in answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"


def test_oversize_body_is_413_before_it_is_read(classifier_server):
    status, answer = post(classifier_server, "/v1/classify", {"input": "a " * MAX_BODY})
    assert status == 413 and f"at most {MAX_BODY}" in answer["error"]["message"]
    # a declared length alone is enough: the client sends headers only, and still gets its answer
    with socket.create_connection(("127.0.0.1", classifier_server.server_port), timeout=30) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        reply = s.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 413") and b"at most %d" % MAX_BODY in reply
    # with Expect: 100-continue the refusal comes instead of the 100, before any of the body is sent
    with socket.create_connection(("127.0.0.1", classifier_server.server_port), timeout=30) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        reply = s.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 413") and b"100 Continue" not in reply


def test_a_body_needs_a_content_length(classifier_server):
    with socket.create_connection(("127.0.0.1", classifier_server.server_port), timeout=30) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n0\r\n\r\n")
        reply = s.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 411") and b"Content-Length" in reply


def test_unknown_paths_and_methods(classifier_server):
    status, answer = post(classifier_server, "/v1/chat/completions", {"messages": []})
    assert status == 404 and "POST /v1/classify" in answer["error"]["message"]
    status, _, data = request(classifier_server, "GET", "/v1/classify")
    assert status == 405 and "takes POST" in json.loads(data)["error"]["message"]
    status, _, data = request(classifier_server, "GET", "/nowhere")
    assert status == 404 and "error" in json.loads(data)
    status, _, data = request(classifier_server, "DELETE", "/health")
    assert status == 405 and "error" in json.loads(data)


# ----------------------------------------------------------------------- chat completions

def greedy_reply(chat, messages, max_tokens):
    """The reply as generate gives it for the same prompt, decoded, and whether it ended at <|im_end|>."""
    prompt = chat.tokenizer.encode(render_chatml(messages, add_generation_prompt=True))
    new = generate(chat.model, [prompt], max_tokens, stop_ids={IM_END})[0]
    stopped = bool(new) and new[-1] == IM_END
    return chat.tokenizer.decode(new[:-1] if stopped else new), stopped, len(prompt), len(new)


MESSAGES = [{"role": "user", "content": "Hi there"}]


def test_chat_completion_is_the_greedy_reply_with_usage(chat_server, chat):
    text, stopped, prompt_tokens, new_tokens = greedy_reply(chat, MESSAGES, 12)
    status, answer = post(chat_server, "/v1/chat/completions",
                          {"model": "anything", "messages": MESSAGES, "max_tokens": 12, "temperature": 0})
    assert status == 200 and answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    choice, = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == ("stop" if stopped else "length")
    assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens,
                               "total_tokens": prompt_tokens + new_tokens}


def test_streamed_chunks_join_to_the_same_reply(chat_server, chat):
    text, stopped, prompt_tokens, new_tokens = greedy_reply(chat, MESSAGES, 12)
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    status, headers, data = request(chat_server, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    payloads = events(data)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]]
    assert "".join(pieces) == text
    assert chunks[-2]["choices"][0]["finish_reason"] == ("stop" if stopped else "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == new_tokens
    assert chunks[-1]["usage"]["prompt_tokens"] == prompt_tokens


def test_seeded_sampling_repeats(chat_server):
    body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 1.5, "seed": 7}
    first, second = (post(chat_server, "/v1/chat/completions", body)[1] for _ in range(2))
    assert first["choices"][0]["message"] == second["choices"][0]["message"]


def test_concurrent_chat_clients_get_the_replies_they_would_alone(chat_server, chat):
    conversations = [[{"role": "user", "content": f"question {i}" * (1 + i % 3)}] for i in range(6)]
    want = [greedy_reply(chat, m, 8)[0] for m in conversations]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda m: post(chat_server, "/v1/chat/completions",
                                           {"messages": m, "max_tokens": 8, "temperature": 0}), conversations))
    assert [a["choices"][0]["message"]["content"] for _, a in got] == want


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0]"),
    ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 65}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": "5"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 180}], "max_tokens": 20}, "max_tokens"),
    ({"messages": MESSAGES, "temperature": -1}, "temperature"),
    ({"messages": MESSAGES, "top_p": 0}, "top_p"),
    ({"messages": MESSAGES, "n": 2}, "n"),
    ({"messages": MESSAGES, "stop": ["\n"]}, "stop"),
    ({"messages": MESSAGES, "stream": "yes"}, "stream"),
])
def test_bad_chat_requests_are_400_naming_the_field(chat_server, body, param):
    status, answer = post(chat_server, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == param, answer


def test_text_parts_are_joined(chat_server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    joined = [{"role": "user", "content": "Hi there"}]
    a, b = (post(chat_server, "/v1/chat/completions", {"messages": m, "max_tokens": 6, "temperature": 0})[1]
            for m in (parts, joined))
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


def test_the_official_openai_client(chat_server, chat):
    openai = pytest.importorskip("openai", reason="the openai client is a test extra (pip install openai)")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{chat_server.server_port}/v1", api_key="unused",
                           max_retries=0)
    text, stopped, prompt_tokens, new_tokens = greedy_reply(chat, MESSAGES, 10)
    reply = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == prompt_tokens and reply.usage.completion_tokens == new_tokens
    stream = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.total_tokens == prompt_tokens + new_tokens
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=1000)


# ----------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, classifier):
    """A finished run folder of the tiny classifier, as ``tinysft finetune`` writes one."""
    from tinysft.app.config import RunConfig
    from tinysft.app.run_folder import write_run
    model_dir, run = tmp_path_factory.mktemp("model"), tmp_path_factory.mktemp("run")
    classifier.model.bert.save_pretrained(model_dir)
    (model_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    write_run(run, RunConfig(model=str(model_dir), max_length=16, dropout=0.0), classifier.model,
              {"model_dir": str(model_dir), "label_names": LABELS, "num_labels": len(LABELS)})
    return run


def serve_subprocess(folder):
    """``tinysft serve FOLDER --port 0`` in its own process, with faulthandler on (see ``stop_on_sigint``)."""
    return subprocess.Popen([sys.executable, "-m", "tinysft", "serve", str(folder), "--port", "0", "--no-log"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def stop_on_sigint(process, within: float = 30):
    """SIGINT, then the exit status within ``within`` seconds. A process still running then is made to
    dump every thread's stack (SIGABRT, caught by faulthandler) and the test fails showing that dump."""
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=within)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _, stderr = process.communicate(timeout=30)
        pytest.fail(f"tinysft serve did not exit within {within} s of SIGINT; its stderr and threads:\n{stderr}")


def test_tinysft_serve_a_run_folder(run_folder, classifier):
    """``tinysft serve RUN --port 0`` in its own process: it names its port, answers, and stops on SIGINT."""
    process = serve_subprocess(run_folder)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving classifier {run_folder} on http://127.0.0.1:"), process.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split(" ")[0])
        server = type("Address", (), {"server_port": port})
        status, answer = post(server, "/v1/classify", {"input": ["a happy cat", "sad"]})
        assert status == 200
        for row, text in zip(answer["data"], ["a happy cat", "sad"]):
            assert row["scores"] == pytest.approx(dict(zip(LABELS, map(float, classifier.probabilities([text])[0]))),
                                                  rel=1e-5)
    finally:
        assert stop_on_sigint(process) == 0


def test_serve_refuses_bad_settings_in_one_line(run_folder):
    from tinysft.app.cli import main
    import contextlib
    import io
    for flags, fragment in ((["--port", "70000"], "port = 70000"), (["--max-body", "0"], "max_body = 0"),
                            (["--model", "x.gguf"], "not both")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["serve", str(run_folder), *flags]) == 2
        assert err.getvalue().count("\n") == 1 and fragment in err.getvalue(), err.getvalue()


def test_tinysft_serve_a_decoder_folder(tmp_path):
    """A folder as ``tinysft sft`` writes one (HF config.json + model.safetensors, its GGUF beside it)."""
    from .tiny_decoder import write_tiny_decoder
    process = serve_subprocess(write_tiny_decoder(tmp_path / "decoder"))
    try:
        line = process.stdout.readline()
        assert line.startswith("serving chat decoder on http://127.0.0.1:"), process.stderr.read()
        server = type("Address", (), {"server_port": int(line.split("http://127.0.0.1:")[1].split(" ")[0])})
        status, answer = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5})
        assert status == 200 and answer["usage"]["completion_tokens"] <= 5
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        assert stop_on_sigint(process) == 0
