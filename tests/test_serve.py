"""The OpenAI-compatible endpoint, over real HTTP on loopback, serving the tiny model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tracetune.format import CHAT_INSTRUCTION, build_prompt
from tracetune.generate import Generator, SamplingConfig
from tracetune.models.registry import load_model
from tracetune.serve import (
    ChatMessage,
    chat_prompt,
    choice_token_ids,
    completion_token_logprobs,
    create_app,
    pick_choice,
    running_server,
    tokenize_choices,
)

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
        ("/completions", {"prompt": "x", "guided_choice": []}, "guided_choice"),
        ("/completions", {"prompt": "x", "guided_choice": ["1", ""]}, "guided_choice"),
        ("/completions", {"prompt": "x", "guided_choice": ["1", "1"]}, "guided_choice"),  # not distinct
        ("/completions", {"prompt": "x", "guided_choice": [str(i) for i in range(1025)]}, "guided_choice"),  # > 1024
        ("/completions", {"prompt": "x", "guided_choice": "1"}, "guided_choice"),  # a string, not a list
        ("/completions", {"prompt": "x", "guided_choice": ["x" * 600]}, "guided_choice"),  # beyond max_context=512
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "structured_outputs": {"choice": []}},
         "structured_outputs.choice"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "structured_outputs": {"regex": "[0-9]"}},
         "structured_outputs"),  # a constraint this server does not serve
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "guided_choice": ["1", "2"],
                               "structured_outputs": {"choice": ["1", "3"]}}, "structured_outputs"),  # both, differing
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


# ------------------------------------------------------------ guided_choice

JUDGE_SCORES = ["1", "2", "3", "4", "5"]  # five choices: every request below scores 8 rows, one compiled program
REFERENCE_WIDTH = 32  # tokens of prompt + choice in choice_logprobs


@nnx.jit
def _plain_logprobs(model, tokens):  # tokens [B, T] -> log p(token t | tokens < t) at every t >= 1, [B, T - 1]
    B, T = tokens.shape
    logits, _ = model(tokens, jnp.broadcast_to(jnp.arange(T), (B, T)), None, jnp.tril(jnp.ones((B, T, T), bool)))  # [B, T, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]


def choice_logprobs(tiny, prompt: str, choices: list[str]) -> list[float]:
    """log p(choice | prompt) for each choice, from Tunix's model's full logits over
    the unpadded prompt + choice (independent of the served path's head-only-where-
    scored log-probs). Rows are right-padded to one width: a causal model's earlier
    positions do not see what follows."""
    prompt_ids = tiny.tokenizer.encode(prompt)
    rows = [prompt_ids + choice_token_ids(tiny.tokenizer, prompt, prompt_ids, c) for c in choices]
    tokens = np.zeros((8, REFERENCE_WIDTH), np.int32)
    for row, ids in enumerate(rows):
        tokens[row, : len(ids)] = ids
    logp = np.asarray(_plain_logprobs(tiny.model, jnp.asarray(tokens)))  # [8, T - 1]
    return [float(logp[row, len(prompt_ids) - 1 : len(ids) - 1].sum()) for row, ids in enumerate(rows)]


def test_greedy_choice_is_the_most_likely_one(client, tiny):
    # Choices of one and of several tokens; the random model prefers one of them.
    choices = ["2>1>4>3", "3", "yes", "no", "4>3"]
    prompt = "Q: Rank the answers.\nA:\n"
    expected = choice_logprobs(tiny, prompt, choices)
    prompt_ids, choice_ids = tokenize_choices(tiny.tokenizer, [prompt], choices)
    served = completion_token_logprobs(tiny.model, tiny.tokenizer.pad_id, prompt_ids * len(choices), choice_ids[0])
    assert np.allclose([lp.sum() for lp in served], expected, atol=1e-4)  # the served scores are the full forward's
    best = int(np.argmax(expected))
    assert sorted(expected)[-1] - sorted(expected)[-2] > 1e-3  # a clear winner, not float noise
    body = complete(client, prompt, temperature=0, guided_choice=choices, max_tokens=1, stop="3")  # neither applies
    assert body["choices"][0] == {"index": 0, "text": choices[best], "finish_reason": "stop", "logprobs": None}
    tokens = len(choice_token_ids(tiny.tokenizer, prompt, tiny.tokenizer.encode(prompt), choices[best]))
    prompt_tokens = len(tiny.tokenizer.encode(prompt))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
    # every other order of the choices picks the same one (no positional bias)
    assert complete(client, prompt, temperature=0, guided_choice=choices[::-1])["choices"][0]["text"] == choices[best]


def test_chat_choice_and_structured_outputs_alias(client, tiny):
    content = "Rate the answer from 1 to 5."
    prompt = chat_prompt(messages(("user", content)), chat=tiny.chat)
    expected = JUDGE_SCORES[int(np.argmax(choice_logprobs(tiny, prompt, JUDGE_SCORES)))]
    by_guided = chat(client, content, temperature=0, guided_choice=JUDGE_SCORES)
    by_alias = chat(client, content, temperature=0, structured_outputs={"choice": JUDGE_SCORES, "disable_fallback": True})
    both = chat(client, content, temperature=0, guided_choice=JUDGE_SCORES, structured_outputs={"choice": JUDGE_SCORES})
    for body in (by_guided, by_alias, both):
        assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
        assert body["choices"][0]["finish_reason"] == "stop"


def test_sampled_choices_are_choices_and_seeded(client):
    def pick(seed: int | None, **fields) -> str:
        return chat(client, "Which is best?", temperature=2.0, seed=seed, guided_choice=JUDGE_SCORES, **fields)["choices"][0]["message"]["content"]

    picks = [pick(seed) for seed in range(12)]
    assert set(picks) <= set(JUDGE_SCORES) and len(set(picks)) > 1  # it samples, among the choices only
    assert [pick(seed) for seed in range(4)] == picks[:4]  # the same seed, the same choice
    assert pick(None) in JUDGE_SCORES
    # completions with several prompts: one choice each, from the choices
    body = complete(client, ["Q: 1?\nA:\n", "Q: 2?\nA:\n"], temperature=1.0, seed=0, guided_choice=JUDGE_SCORES[:4])
    assert [c["index"] for c in body["choices"]] == [0, 1] and {c["text"] for c in body["choices"]} <= set(JUDGE_SCORES[:4])


@pytest.mark.parametrize(
    "totals, temperature, expected",
    [
        ([-3.0, -1.0, -2.0], 0.0, 1),  # greedy: the largest total
        ([-1.0, -1.0], 0.0, 0),  # equals: the first
        ([-1e9, -2e9, float("-inf")], 0.0, 0),  # huge magnitudes, an impossible choice
        ([0.0, -50.0], 1.0, 0),  # exp(-50): never drawn
    ],
)
def test_pick_choice(totals, temperature, expected):
    assert pick_choice(totals, temperature, np.random.default_rng(0)) == expected


def test_pick_choice_samples_in_proportion_to_exp_logprob_over_temperature():
    totals, temperature = np.log([0.5, 0.3, 0.2]), 0.5  # p ~ [0.25, 0.09, 0.04] / 0.38
    rng = np.random.default_rng(0)
    counts = np.bincount([pick_choice(totals, temperature, rng) for _ in range(20_000)], minlength=3)
    expected = np.array([0.25, 0.09, 0.04]) / 0.38
    assert np.allclose(counts / counts.sum(), expected, atol=0.015)
    with pytest.raises(ValueError, match="not usable"):
        pick_choice([float("nan"), 0.0], 0.0, rng)


def test_choice_tokens_keep_the_prompts_own(tiny):
    tok = tiny.tokenizer
    prompt = "Q: x\nA:\n"
    # the usual case: the joint tokenisation extends the prompt's
    assert choice_token_ids(tok, prompt, tok.encode(prompt), "2>1") == tok.encode(prompt + "2>1")[len(tok.encode(prompt)):]
    # "h" + "e" is one token "he" in the tiny vocabulary: the prompt keeps its "h", the choice is tokenised alone
    assert tok.encode("Q: he")[: len(tok.encode("Q: h"))] != tok.encode("Q: h")
    ids = choice_token_ids(tok, "Q: h", tok.encode("Q: h"), "e")
    assert ids == tok.encode("e", add_bos=False) and tok.decode(tok.encode("Q: h") + ids) == "Q: he"
