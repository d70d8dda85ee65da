"""The server through the official ``openai`` client: chat, completions, streaming, adapters, health, metrics."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest

from qlorakit.cli.main import main
from qlorakit.generate.sampling import SamplingConfig
from tests.serve.conftest import BASE_ID, KEY

QUESTION = "What is the capital of France?"


def _chat(client, model, text=QUESTION, **settings):
    settings.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **settings)


def test_models_lists_the_base_and_every_adapter(client):
    assert sorted(m.id for m in client.models.list().data) == sorted([BASE_ID, "x", "y"])


def test_base_and_two_adapters_answer_as_qlorakit_generate(client, base_dir, adapter_dirs, tmp_path, reference):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": QUESTION, "adapter": a}) + "\n" for a in ("base", "x", "y")))
    out = tmp_path / "generate.jsonl"
    assert main(["generate", "--model", str(base_dir), "--adapter", f"x={adapter_dirs['x']}", "--adapter",
                 f"y={adapter_dirs['y']}", "--prompts", str(prompts), "--max-new-tokens", "10",
                 "--output", str(out)]) == 0
    expected = [json.loads(line) for line in out.read_text().splitlines()]
    answers = [_chat(client, model, max_tokens=10) for model in (BASE_ID, "x", "y")]
    texts = [a.choices[0].message.content for a in answers]
    assert texts == [row["text"] for row in expected]
    assert len(set(texts)) == 3
    for answer, row in zip(answers, expected, strict=True):
        assert answer.usage.prompt_tokens == row["prompt_tokens"] == len(reference.chat_ids(QUESTION))
        assert answer.usage.completion_tokens == len(row["token_ids"])
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
        assert answer.choices[0].finish_reason == ("length" if row["finish_reason"] == "length" else "stop")


def test_completions_take_the_raw_prompt(client, reference):
    answer = client.completions.create(model="y", prompt="Once upon a time", max_tokens=7, temperature=0)
    from qlorakit.generate import generate_text, use_adapter

    use_adapter(reference.model, "y")
    ids = reference.tokenizer("Once upon a time")["input_ids"]
    want = generate_text(reference.model, reference.tokenizer, ids, 7)
    assert answer.choices[0].text == want.text and answer.object == "text_completion"
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 7


def test_streamed_pieces_join_to_the_answer_and_carry_usage(client, reference):
    chunks = list(_chat(client, "x", max_tokens=9, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.chat("x", QUESTION, 9).text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9


def test_the_raw_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": "y", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_a_stop_string_ends_the_text_before_it(client, reference):
    full = reference.chat("x", QUESTION, 12).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    answer = _chat(client, "x", max_tokens=12, stop=[stop])
    assert answer.choices[0].message.content == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in _chat(client, "x", max_tokens=12, stop=stop,
                                                                        stream=True))
    assert streamed == full[: full.index(stop)]


def test_a_seeded_sampled_request_is_the_seeded_generate(client, reference):
    sampling = SamplingConfig(temperature=0.9, top_p=0.8, seed=7)
    want = reference.chat("y", QUESTION, 10, sampling).text
    for _ in range(2):
        assert _chat(client, "y", max_tokens=10, temperature=0.9, top_p=0.8, seed=7).choices[0].message.content == want


def test_adapters_load_and_delete_while_serving(client, server, adapter_dirs, reference):
    headers = {"Authorization": f"Bearer {KEY}"}
    added = httpx.post(server.url + "/v1/adapters", json={"name": "z", "path": str(adapter_dirs["z"])},
                       headers=headers, timeout=30)
    assert added.status_code == 200 and added.json()["id"] == "z"
    assert "z" in [m.id for m in client.models.list().data]
    assert _chat(client, "z", max_tokens=8).choices[0].message.content == reference.chat("z", QUESTION, 8).text
    again = httpx.post(server.url + "/v1/adapters", json={"name": "z", "path": str(adapter_dirs["z"])},
                       headers=headers, timeout=30)
    assert again.status_code == 409 and "already loaded" in again.json()["error"]["message"]
    gone = httpx.delete(server.url + "/v1/adapters/z", headers=headers, timeout=30)
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _chat(client, "z", max_tokens=2)
    assert httpx.delete(server.url + "/v1/adapters/z", headers=headers, timeout=30).status_code == 404
    assert _chat(client, "x", max_tokens=8).choices[0].message.content == reference.chat("x", QUESTION, 8).text


def test_an_adapter_that_does_not_fit_the_base_is_refused(server, tmp_path):
    from tests.generate.test_generate_cli import _write_adapter

    wrong = _write_adapter(tmp_path / "wide", str(tmp_path), hidden=576)  # SmolLM2's width, not the tiny base's
    headers = {"Authorization": f"Bearer {KEY}"}
    for path in (wrong, tmp_path / "missing"):
        answer = httpx.post(server.url + "/v1/adapters", json={"name": "bad", "path": str(path)}, headers=headers,
                            timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "path"
    assert httpx.get(server.url + "/health").json()["adapters"] == ["x", "y"]


def test_health_metrics_and_one_log_line_per_request(client, server, caplog):
    caplog.set_level(logging.INFO, logger="qlorakit.serve")
    _chat(client, BASE_ID, max_tokens=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "qlorakit.serve"]
    assert len(lines) == 1 and lines[0].startswith(f"chat adapter={BASE_ID} status=200 prompt_tokens=")
    assert "completion_tokens=" in lines[0] and "latency_ms=" in lines[0] and "queue_ms=" in lines[0]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["adapters"] == ["x", "y"]
    text = httpx.get(server.url + "/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines[f'qlorakit_requests_total{{endpoint="chat",model="{BASE_ID}",status="200"}}']) >= 1
    assert float(lines["qlorakit_completion_tokens_total"]) >= 3
    assert float(lines["qlorakit_decode_rows_total"]) >= float(lines["qlorakit_decode_steps_total"]) > 0
    assert "# TYPE qlorakit_queue_depth gauge" in text
