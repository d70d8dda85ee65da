"""A bounded load test: 16 concurrent clients x 4 greedy requests over mixed adapters, three rounds."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from qlorakit.hardware import current_rss_mb
from tests.serve.conftest import BASE_ID, KEY

CLIENTS, REQUESTS, ROUNDS = 16, 4, 3
TOPICS = ["a cat", "Paris", "the sea", "numbers", "a bird", "rivers", "a dog", "today"]
MODELS = [BASE_ID, "x", "y"]


def _work(client_index):
    """(model, prompt, max_tokens) of every request of one client: the adapters and lengths vary."""
    return [(MODELS[(client_index + r) % 3], f"Tell me about {TOPICS[(client_index * 3 + r) % len(TOPICS)]}.",
             4 + (client_index + 2 * r) % 9) for r in range(REQUESTS)]


def _metric(server, name):
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


def test_concurrent_mixed_adapters_equal_sequential_decoding_with_flat_memory(server, reference):
    expected = {job: reference.chat(None if job[0] == BASE_ID else job[0], job[1], job[2]).text
                for i in range(CLIENTS) for job in _work(i)}
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def run_client(client_index):
        answers = []
        for model, prompt, max_tokens in _work(client_index):
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=max_tokens, temperature=0)
            answers.append(((model, prompt, max_tokens), reply.choices[0].message.content))
        return answers

    rss, batches = [], []
    for _ in range(ROUNDS):
        steps, rows = _metric(server, "qlorakit_decode_steps_total"), _metric(server, "qlorakit_decode_rows_total")
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = [a for per_client in pool.map(run_client, range(CLIENTS)) for a in per_client]
        assert len(answers) == CLIENTS * REQUESTS
        assert {job: text for job, text in answers} == expected
        batches.append((_metric(server, "qlorakit_decode_rows_total") - rows)
                       / (_metric(server, "qlorakit_decode_steps_total") - steps))
        rss.append(current_rss_mb())
    assert min(batches) > 2  # requests really shared decoding steps
    assert rss[-1] - rss[1] < 16, rss  # flat after the first round (allocator warm-up)
