"""The OpenAI-compatible endpoint, over real HTTP on loopback, serving the tiny model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tracetune.format import CHAT_INSTRUCTION, build_prompt
from tracetune.generate import Generator, SamplingConfig
from tracetune.models.registry import load_model
from tracetune.serve import ChatMessage, chat_prompt, create_app, running_server

MAX_TOKENS = 16  # one decode chunk: every request below reuses the same compiled programs


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def client(tiny):
    app = create_app(tiny, model_name="tiny-served", max_batch=4, default_max_tokens=MAX_TOKENS, max_context=512)
    with running_server(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as http:
        yield http


def chat(client: httpx.Client, content: str, **fields) -> dict:
    response = client.post("/chat/completions", json={"messages": [{"role": "user", "content": content}], **fields})
    assert response.status_code == 200, response.text
    return response.json()


def complete(client: httpx.Client, prompt: str, **fields) -> dict:
    response = client.post("/completions", json={"prompt": prompt, **fields})
    assert response.status_code == 200, response.text
    return response.json()


# ------------------------------------------------------------------ prompts


def messages(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in pairs]


def test_chat_prompt_shapes():
    # plain: a lone user message is the recipe's prompt, what a tracetune model was trained on
    assert chat_prompt(messages(("user", "What is 2 + 2?")), chat=False) == build_prompt("What is 2 + 2?")
    # chat: a system message plus a user message is the project's chat prompt
    assert chat_prompt(messages(("system", CHAT_INSTRUCTION), ("user", "What is 2 + 2?")), chat=True) == build_prompt(
        "What is 2 + 2?", "chat"
    )
    conversation = messages(("system", "Be brief."), ("user", " 1 + 1? "), ("assistant", "2"), ("user", "2 + 2?"))
    assert chat_prompt(conversation, chat=True) == (
        "<start_of_turn>user\nBe brief.\n\n1 + 1?<end_of_turn>\n"
        "<start_of_turn>model\n2<end_of_turn>\n"
        "<start_of_turn>user\n2 + 2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert chat_prompt(conversation, chat=False) == "Q: Be brief.\n\n1 + 1?\nA:\n2\nQ: 2 + 2?\nA:\n"
    # a system message alone becomes the user's turn (Gemma has no system role)
    assert chat_prompt(messages(("system", "Say hi.")), chat=True) == "<start_of_turn>user\nSay hi.<end_of_turn>\n<start_of_turn>model\n"


# ---------------------------------------------------------------- endpoints


def test_models_lists_the_served_name(client):
    body = client.get("/models").json()
    assert [m["id"] for m in body["data"]] == ["tiny-served"] and body["object"] == "list"


def test_greedy_chat_is_deterministic_and_equals_the_generator(client, tiny):
    first = chat(client, "What is 2 + 3?", temperature=0, model="tiny-served")  # the served name (another is a 404: test_faults.py)
    second = chat(client, "What is 2 + 3?", temperature=0)
    reference = Generator(tiny.model, tiny.tokenizer).generate(
        [build_prompt("What is 2 + 3?")], SamplingConfig(max_new_tokens=MAX_TOKENS, stop_strings=())
    )[0]
    assert first["choices"][0]["message"] == {"role": "assistant", "content": reference.text}
    assert second["choices"] == first["choices"]
    assert first["model"] == "tiny-served" and first["object"] == "chat.completion" and first["id"].startswith("chatcmpl-")
    assert isinstance(first["created"], int)
    # the random tiny model never says EOS within 16 tokens: the budget ends it
    assert first["choices"][0]["finish_reason"] == "length"
    assert first["usage"] == {
        "prompt_tokens": reference.prompt_tokens,  # BOS included
        "completion_tokens": MAX_TOKENS,
        "total_tokens": reference.prompt_tokens + MAX_TOKENS,
    }


def test_max_tokens_is_honoured(client):
    for field in ("max_tokens", "max_completion_tokens"):
        body = chat(client, "What is 2 + 3?", temperature=0, **{field: 5})
        assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"
    body = complete(client, "Q: 7?\nA:\n", temperature=0, max_tokens=3)
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_is_reproducible(client):
    def text(seed: int) -> str:
        return complete(client, "Q: 1?\nA:\n", temperature=1.0, seed=seed)["choices"][0]["text"]

    assert text(3) == text(3) != text(4)


def test_stop_strings_cut_the_text(client):
    # Seeded sampling gives the random model varied text to cut.
    full = complete(client, "Q: 1?\nA:\n", temperature=1.0, seed=3)["choices"][0]["text"]
    start = next(i for i in range(2, len(full) - 1) if full[i : i + 2].isalnum())
    stop = full[start : start + 2]
    expected = full[: full.index(stop)]  # OpenAI's shape: the text before the stop string

    body = complete(client, "Q: 1?\nA:\n", temperature=1.0, seed=3, stop=stop)
    assert body["choices"][0] == {"index": 0, "text": expected, "finish_reason": "stop", "logprobs": None}
    listed = complete(client, "Q: 1?\nA:\n", temperature=1.0, seed=3, stop=["never there", stop])
    assert listed["choices"][0]["text"] == expected
    kept = complete(client, "Q: 1?\nA:\n", temperature=1.0, seed=3, stop=stop, include_stop_str_in_output=True)
    assert kept["choices"][0]["text"] == expected + stop


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),  # one choice only
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
        ("/chat/completions", {"model": "tiny"}, "messages"),  # missing messages
        ("/chat/completions", {"messages": []}, "messages"),
        ("/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ("/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True}, "stream"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
        ("/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/completions", {"prompt": "x", "max_tokens": 10_000}, "max_tokens"),  # beyond max_context=512
        ("/completions", {"temperature": 0}, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors(client, path, body, param):
    response = client.post(path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_error_messages_say_what_is_wrong(client):
    def message(path, **kwargs):
        return client.post(path, **kwargs).json()["error"]["message"]

    assert "only n=1" in message("/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 2})
    assert "not valid JSON" in message("/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
    too_long = client.post("/completions", json={"prompt": "x", "max_tokens": 10_000}).json()["error"]
    assert too_long["code"] == "context_length_exceeded" and "512" in too_long["message"]
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"


def test_concurrent_requests_all_succeed_and_match_sequential_ones(client):
    questions = [f"What is {i} + {i}?" for i in range(6)]
    sequential = [chat(client, q, temperature=0)["choices"][0]["message"]["content"] for q in questions]
    with ThreadPoolExecutor(max_workers=6) as pool:  # greedy and alike: decoded in shared batches
        together = list(pool.map(lambda q: chat(client, q, temperature=0)["choices"][0]["message"]["content"], questions))
    assert together == sequential


def test_the_event_loop_answers_while_generating(client):
    # 200 tokens: a new cache size, so this request compiles and decodes for a while in its thread
    worker = threading.Thread(target=chat, args=(client, "What is 9 + 9?"), kwargs={"temperature": 0, "max_tokens": 200})
    worker.start()
    time.sleep(0.3)
    start = time.perf_counter()
    assert client.get("/models").status_code == 200
    elapsed = time.perf_counter() - start
    still_generating = worker.is_alive()
    worker.join()
    assert still_generating and elapsed < 1.0
