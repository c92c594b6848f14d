"""`dsv3 serve` under load and at shutdown (one server process for the module, SIGTERM last): 64
concurrent streaming clients, overload beyond the admission queue (503 + Retry-After, counted),
clients that disconnect (their blocks freed), SIGTERM draining the running requests and exiting 0."""

import asyncio
import json
import random
import time

import httpx
import pytest
from serve_util import Server, make_ckpt, metric

QUEUE = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_ckpt(tmp_path_factory.mktemp("serve_ckpt"))
    s = Server(ckpt, "--max-queued-requests", str(QUEUE), "--max-num-seqs", "8", "--num-blocks", "256",
               "--block-size", "8", "--drain-timeout", "60", "--enable-prefix-caching")  # fmt: skip
    yield s
    if s.proc.poll() is None:
        s.proc.kill()


async def _stream(client: httpx.AsyncClient, body: dict) -> tuple[int, list[dict]]:
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, []
        events = []
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
            elif line == "data: [DONE]":
                events.append({"done": True})
        return 200, events


def _wait_idle(url: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics").text
        if metric(text, "dsv3:kv_cache_blocks_used") == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def test_64_concurrent_streaming_clients_get_their_token_counts(server):
    rng = random.Random(0)
    bodies = [{"prompt": [rng.randrange(5, 300) for _ in range(rng.randint(1, 40))], "max_tokens": rng.randint(1, 8),
               "ignore_eos": True, "logprobs": 0, "stream_options": {"include_usage": True}} for _ in range(64)]  # fmt: skip

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(*[_stream(c, b) for b in bodies])

    results = asyncio.run(go())
    for body, (status, events) in zip(bodies, results):
        assert status == 200 and events[-1] == {"done": True}
        usage = events[-2]["usage"]
        assert usage["completion_tokens"] == body["max_tokens"] and usage["prompt_tokens"] == len(
            body["prompt"]
        )
        streamed = sum(
            len(e["choices"][0]["logprobs"]["tokens"]) for e in events[:-2] if e["choices"][0]["logprobs"]
        )
        assert streamed == body["max_tokens"]
    assert metric(_wait_idle(server.url), "dsv3:kv_cache_blocks_used") == 0


def test_overload_beyond_the_queue_gets_503_with_retry_after(server):
    before = metric(httpx.get(server.url + "/metrics").text, "dsv3:admission_rejections_total")
    body = {"prompt": [7, 8, 9], "max_tokens": 64, "ignore_eos": True}

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(QUEUE + 32)])

    responses = asyncio.run(go())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= QUEUE // 2
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "max-queued-requests" in busy.json()["error"]["message"]
    assert all(r.json()["usage"]["completion_tokens"] == 64 for r in responses if r.status_code == 200)
    after = metric(_wait_idle(server.url), "dsv3:admission_rejections_total")
    assert after - before == codes.count(503)
    assert httpx.get(server.url + "/health").status_code == 200


def test_clients_that_disconnect_leave_no_blocks(server):
    aborted = 'dsv3:request_success_total{finished_reason="abort",model_name="%s"}'
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 200, "ignore_eos": True, "stream": True}

    async def leave_after_first_chunk(c: httpx.AsyncClient):
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    return  # closing the stream drops the connection mid-response

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            await asyncio.gather(*[leave_after_first_chunk(c) for _ in range(16)])
        # a non-streaming client that gives up on 16 choices (two waves of --max-num-seqs 8)
        async with httpx.AsyncClient(base_url=server.url, timeout=0.3) as c:
            with pytest.raises(httpx.TimeoutException):
                await c.post("/v1/completions", json={**body, "stream": False, "n": 16, "max_tokens": 240})

    asyncio.run(go())
    text = _wait_idle(server.url)
    assert metric(text, "dsv3:kv_cache_blocks_used") == 0 and metric(text, "dsv3:num_requests_running") == 0
    name = json.loads(httpx.get(server.url + "/v1/models").text)["data"][0]["id"]
    assert float(text.split(aborted % name)[1].split()[0]) >= 16 + 8  # the second wave had not started


def test_a_repeated_prompt_reports_cached_tokens(server):
    prompt = list(range(100, 200))  # 100 tokens: 12 full blocks of 8 can come from the cache
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    first = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    second = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "dsv3:prefix_cache_hits_total") >= 96
    assert metric(text, "dsv3:prefix_cache_queries_total") >= 200


def test_sigterm_drains_running_requests_and_exits_0(server):
    body = {
        "prompt": [5, 6, 7],
        "max_tokens": 40,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            tasks = [asyncio.create_task(_stream(c, body)) for _ in range(4)]
            while metric((await c.get("/metrics")).text, "dsv3:num_requests_running") < 1:
                await asyncio.sleep(0.02)
            server.proc.send_signal(15)
            return await asyncio.gather(*tasks)

    results = asyncio.run(go())
    for status, events in results:  # every accepted request finished with all its tokens
        assert (
            status == 200 and events[-1] == {"done": True} and events[-2]["usage"]["completion_tokens"] == 40
        )
    assert server.proc.wait(60) == 0
    assert any("stopped" in line for line in server.lines)
