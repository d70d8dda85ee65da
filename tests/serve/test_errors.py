"""Every limit and error in OpenAI's error shape, the server serving on after each; cancellation on disconnect."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from qlorakit.serve.config import exposure_warning
from tests.serve.conftest import BASE_ID, KEY, LIMITS, start_server

AUTH = {"Authorization": f"Bearer {KEY}"}


def _post(server, path, headers=AUTH, **kwargs):
    return httpx.post(server.url + path, headers=headers, timeout=30, **kwargs)


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _still_serves(client):
    answer = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                            temperature=0)
    assert answer.usage.completion_tokens >= 1 or answer.choices[0].finish_reason == "stop"


def test_bad_json_and_bad_fields_are_400(server, client):
    assert _error(_post(server, "/v1/chat/completions", content=b"{not json"), 400)["code"] == "invalid_json"
    error = _error(_post(server, "/v1/chat/completions", json={"model": "x", "messages": []}), 400)
    assert error["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], temperature=5)
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="x", prompt="hi", max_tokens=LIMITS["max_tokens_limit"] + 1)
    _still_serves(client)


def test_a_missing_or_wrong_key_is_401(server, client):
    assert _error(_post(server, "/v1/completions", headers={}, json={}), 401)["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY + "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key
    _still_serves(client)


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist") as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["param"] == "model"
    _still_serves(client)


def test_a_large_body_or_prompt_is_413(server, client):
    big = "word " * (LIMITS["max_body_bytes"] // 4)
    _error(_post(server, "/v1/completions", json={"model": "x", "prompt": big}), 413)
    long_prompt = "The capital of France is Paris. " * 40  # > max_prompt_tokens tokens, < max_body_bytes bytes
    error = _error(_post(server, "/v1/completions", json={"model": "x", "prompt": long_prompt}), 413)
    assert error["code"] == "context_length_exceeded"
    _still_serves(client)


@pytest.fixture
def one_slot(base_dir):
    """A server that decodes one request at a time and queues one more."""
    running = start_server(base_dir, {}, max_batch=1, max_queue=1)
    yield running
    running.close()


def _wait(predicate, seconds=20):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _health(server):
    return httpx.get(server.url + "/health").json()


def _long_stream(server, max_tokens=1400):
    # greedy: the tiny random model falls into a loop without EOS (sampled, it met EOS after ~600 tokens)
    body = {"model": BASE_ID, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    return httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60)


def test_a_full_queue_is_429_and_a_disconnect_frees_the_slot(one_slot):
    client = openai.OpenAI(base_url=one_slot.url + "/v1", api_key="unused", max_retries=0)
    with _long_stream(one_slot) as first:
        lines = first.iter_lines()
        next(lines)  # generating: the one slot is taken
        _wait(lambda: _health(one_slot)["running"] == 1)
        with _long_stream(one_slot) as second:  # admitted to the queue, it waits for the slot
            _wait(lambda: _health(one_slot)["waiting"] == 1)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model=BASE_ID, prompt="hi", max_tokens=2)
            first.close()  # the client goes away mid-stream: its slot goes to the waiting request
            assert second.status_code == 200
            assert next(second.iter_lines()).startswith("data: ")
        _wait(lambda: _health(one_slot) == {"status": "ok", "running": 0, "waiting": 0, "adapters": []})
    def cancelled():
        return [line for line in httpx.get(one_slot.url + "/metrics").text.splitlines()
                if line.startswith("qlorakit_cancelled_total")]

    # the second stream's disconnect is noticed at the server's next write, so under load the count may lag
    _wait(lambda: cancelled() != ["qlorakit_cancelled_total 1"])
    assert cancelled() == ["qlorakit_cancelled_total 2"]
    assert client.completions.create(model=BASE_ID, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_a_stopped_engine_is_503(base_dir):
    running = start_server(base_dir, {})
    try:
        running.engine.stop()
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(model=BASE_ID, prompt="hi", max_tokens=2)
        assert caught.value.status_code == 503
        assert _health(running)["status"] == "stopped"
    finally:
        running.close(stop_engine=False)


def test_binding_all_interfaces_without_a_key_warns():
    assert "without --api-key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "k") is None and exposure_warning("127.0.0.1", None) is None
