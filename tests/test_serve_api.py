"""`dsv3 serve` as a real subprocess, driven with the official `openai` client and raw HTTP: the
completions and chat endpoints (greedy == `LLM.generate` token for token, streaming == non-streaming,
n, seeds, logprobs, echo with prompt logprobs, stop strings across tokens, FIM through `suffix`),
the small endpoints, the error contract (a table of bad requests, a bounded fuzz), /metrics and
`dsv3 bench serve`. One server process serves the whole module."""

import json
import time

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_util import Server, make_ckpt, metric

from dsv3.infer import LLM, SamplingParams

KEY = "sk-test"
MODEL = "tiny"
MAX_BODY = 65536


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("serve_ckpt"))


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--api-key", KEY, "--served-model-name", MODEL, "--num-blocks", "128",
               "--block-size", "8", "--max-request-bytes", str(MAX_BODY))  # fmt: skip
    yield s
    assert s.terminate() == 0, "".join(s.lines[-20:])


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, num_blocks=128, block_size=8)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


GREEDY = dict(temperature=0, max_tokens=12)
PROMPTS = ["def add(a, b):", "To be, or not"]


def test_completions_greedy_equal_llm_generate(client, llm):
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS, extra_body={"return_token_ids": True}, **GREEDY
    )
    expected = llm.generate(PROMPTS, SamplingParams(**GREEDY))
    assert [c.index for c in r.choices] == [0, 1]
    for choice, exp in zip(r.choices, expected):
        assert choice.model_extra["token_ids"] == exp.token_ids
        assert choice.text == exp.text and choice.finish_reason == exp.finish_reason
    assert r.usage.prompt_tokens == sum(len(llm.tokenizer.encode(p)) for p in PROMPTS)
    assert r.usage.completion_tokens == sum(len(e.token_ids) for e in expected)
    # token-id prompts (one, and a list of them) give the same
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    r1 = client.completions.create(model=MODEL, prompt=ids[0], **GREEDY)
    r2 = client.completions.create(model=MODEL, prompt=ids, **GREEDY)
    assert r1.choices[0].text == expected[0].text and [c.text for c in r2.choices] == [
        e.text for e in expected
    ]


def _streamed_text(client, **kw) -> tuple[list[str], list]:
    chunks = list(client.completions.create(model=MODEL, stream=True, **kw))
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    return [texts[i] for i in sorted(texts)], chunks


def test_streaming_concatenates_to_the_non_streamed_text_also_with_a_stop_across_tokens(client, llm):
    full = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=16))[0]
    pieces = [llm.tokenizer.decode([t]) for t in full.token_ids]
    # a stop string from the last 2 characters of token 3 to the first of token 4 (straddling them)
    cut = len("".join(pieces[:4]))
    stop = full.text[cut - 2 : cut + 1]
    assert len(stop) == 3 and stop not in full.text[: cut - 2]
    for kw in ({}, {"stop": [stop, "zzz"]}):
        plain = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=16, **kw)
        streamed, chunks = _streamed_text(client, prompt=PROMPTS[0], temperature=0, max_tokens=16, **kw)
        assert streamed == [plain.choices[0].text]
        assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert (
        plain.choices[0].text == full.text[: full.text.find(stop)]
        and plain.choices[0].finish_reason == "stop"
    )


def test_raw_sse_and_the_usage_chunk(http):
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    data = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] == 5
    assert all(d["usage"] is None for d in data[:-1])
    assert data[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_streaming_and_not_equal_llm_chat(client, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add"}]
    exp = llm.chat(messages, SamplingParams(temperature=0, max_tokens=10))
    r = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_completion_tokens=10
    )
    assert r.choices[0].message.content == exp.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(llm.tokenizer.apply_chat_template(messages))
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10,
                                                 stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == exp.text
    assert chunks[-1].choices[0].finish_reason == exp.finish_reason


def test_n_and_seeds_match_generate_with_seed_plus_index(client, llm):
    kw = dict(temperature=0.9, top_k=20, min_p=0.01, max_tokens=8)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], n=2, seed=5, temperature=0.9, max_tokens=8,
                                  extra_body={"top_k": 20, "min_p": 0.01, "return_token_ids": True})  # fmt: skip
    expected = llm.generate([PROMPTS[0]] * 2, [SamplingParams(seed=5, **kw), SamplingParams(seed=6, **kw)])
    assert [c.model_extra["token_ids"] for c in r.choices] == [e.token_ids for e in expected]
    streamed, _ = _streamed_text(client, prompt=PROMPTS[0], n=2, seed=5, temperature=0.9, max_tokens=8,
                                 extra_body={"top_k": 20, "min_p": 0.01})  # fmt: skip
    assert streamed == [c.text for c in r.choices]


def test_logprobs_top_logprobs_and_text_offset(client, llm):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], logprobs=3, **GREEDY)
    exp = llm.generate([PROMPTS[0]], SamplingParams(logprobs=3, **GREEDY))[0]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(exp.token_ids) == r.usage.completion_tokens
    assert lp.token_logprobs == pytest.approx([e[t] for t, e in zip(exp.token_ids, exp.logprobs)], abs=1e-5)
    assert all(len(top) == 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                          top_logprobs=2, **GREEDY)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)


def test_echo_returns_prompt_logprobs(client, llm):
    ids = llm.tokenizer.encode(PROMPTS[1])
    r = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    with torch.no_grad():
        ref = llm.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
    assert r.choices[0].text.startswith(llm.tokenizer.decode(ids))
    # max_tokens 0 with echo: scoring only (lm-evaluation-harness' loglikelihood requests)
    r0 = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=0, max_tokens=0)
    assert (
        r0.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
        and r0.usage.completion_tokens == 0
    )


def test_lm_eval_harness_request_shapes(http, llm):
    """What lm-evaluation-harness's `local-completions` sends: its remote tokenizer's probes
    (/tokenizer_info, /tokenize with add_special_tokens) and a log-likelihood batch (token-id prompts
    of different lengths, max_tokens=1, echo, logprobs=1, seed); it sums token_logprobs[ctxlen:-1]."""
    info = http.get("/tokenizer_info").json()
    tok = llm.tokenizer
    assert (info["bos_token"], info["eos_token"]) == (tok.bos_token, tok.eos_token) and info["chat_template"]
    assert info["model_max_length"] == 256
    for special in (False, True):
        got = http.post("/tokenize", json={"prompt": "def add", "add_special_tokens": special}).json()
        assert got["tokens"] == tok.encode("def add")
    assert http.post("/tokenize", json={"prompt": tok.bos_token}).json()["tokens"] == [tok.bos_id]
    pairs = [("To be, or not", " to be"), ("def add(a, b):", "\n    return a + b")]
    prompts, ctxlens = [], []
    for ctx, cont in pairs:
        c = [tok.bos_id, *tok.encode(ctx)]
        prompts.append(c + tok.encode(cont))
        ctxlens.append(len(c))
    body = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}  # fmt: skip
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 2
    for ch, ids, n in zip(choices, prompts, ctxlens):
        lps = ch["logprobs"]["token_logprobs"]
        assert len(lps) == len(ids) + 1 and lps[0] is None and all(v is not None for v in lps[1:])
        with torch.no_grad():
            ref = llm.model(torch.tensor([ids]))[0].float().log_softmax(-1)
        want = sum(float(ref[i - 1, ids[i]]) for i in range(n, len(ids)))
        assert sum(lps[n:-1]) == pytest.approx(want, abs=1e-3)


def test_fim_through_suffix_equals_llm_complete(client, llm):
    prefix, suffix = "def add(a, b):\n    return ", "\n"
    params = SamplingParams(temperature=0, max_tokens=8)
    r = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, temperature=0, max_tokens=8)
    assert r.choices[0].text == llm.complete(prefix, suffix, params)


def test_models_health_version_tokenize_detokenize(http, llm):
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["data"][0]["max_model_len"] == 256
    assert http.get("/health").status_code == 200
    assert "version" in http.get("/version").json()
    tok = http.post("/tokenize", json={"prompt": "def add"}).json()
    assert tok["tokens"] == llm.tokenizer.encode("def add") and tok["count"] == len(tok["tokens"])
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "def add"
    schema = http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
            "/detokenize", "/tokenizer_info", "/version"} <= set(schema["paths"])  # fmt: skip


BAD = [
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": {"a": 1}}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, 400, "echo"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1], [-2]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "def add " * 100}, 400, "prompt"),  # longer than the context
    ("/v1/completions", {"prompt": "x", "stream": True, "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 2], "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "model"),
    (
        "/v1/completions",
        {"prompt": "x", "stream_options": {"include_usage": 3}},
        400,
        "stream_options.include_usage",
    ),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),  # fmt: skip
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs",
    ),  # fmt: skip
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stream": True, "n": 0},
        400,
        "n",
    ),
    ("/detokenize", {"tokens": [1, 100000]}, 400, "tokens"),
]


@pytest.mark.parametrize(
    "path,body,status,param", BAD, ids=[f"{p}:{json.dumps(b)[:40]}" for p, b, _, _ in BAD]
)
def test_bad_requests_get_the_documented_status_naming_the_field(http, path, body, status, param):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split(".")[0].split("[")[0] in err["message"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status


def test_raw_bodies_keys_routes_and_sizes(http, server):
    post = lambda content: http.post(
        "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    assert post(b"{bad").status_code == 400 and "JSON" in post(b"{bad").json()["error"]["message"]
    r = post(b'{"prompt": "\xff\xfe"}')
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    r = post(json.dumps({"prompt": "x" * MAX_BODY}).encode())
    assert r.status_code == 413 and "request body" in r.json()["error"]["message"]
    assert http.get("/v1/nothing").status_code == 404 and "error" in http.get("/v1/nothing").json()
    anonymous = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
    wrong = httpx.post(
        server.url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer no"}
    )
    assert wrong.status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # not behind the key


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)  # JSON has no infinity
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = ["model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "stop",
          "stop_token_ids", "ignore_eos", "logprobs", "echo", "stream", "stream_options", "messages",
          "max_completion_tokens", "top_logprobs"]  # fmt: skip
SMALL = {"max_tokens": st.integers(0, 4), "n": st.integers(1, 2), "prompt": st.text(min_size=1, max_size=20)}


@st.composite
def bodies(draw):
    body = {}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True)):
        body[name] = draw(JSON if name not in SMALL or draw(st.booleans()) else SMALL[name])
    body.setdefault("max_tokens", draw(SMALL["max_tokens"]))
    if draw(st.booleans()):
        body["prompt"] = draw(SMALL["prompt"])
    return body


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=bodies())
def test_fuzzed_requests_never_get_a_5xx(http, path, body):
    if (
        path.endswith("chat/completions")
        and isinstance(body.get("max_tokens"), int)
        and body["max_tokens"] == 0
    ):
        body["max_tokens"] = 1
    r = http.post(path, json=body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_metrics_and_no_leaked_blocks_after_everything(http):
    """Runs after the fuzz: the engine is alive and every cache block is free again."""
    deadline = time.monotonic() + 30
    while True:
        text = http.get("/metrics").text
        if metric(text, "dsv3:kv_cache_blocks_used") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert metric(text, "dsv3:kv_cache_blocks_used") == 0
    assert http.get("/health").status_code == 200
    assert metric(text, "dsv3:num_requests_running") == 0 and metric(text, "dsv3:engine_alive") == 1
    assert metric(text, "dsv3:prompt_tokens_total") > 0 and metric(text, "dsv3:generation_tokens_total") > 0
    assert metric(text, "dsv3:time_to_first_token_seconds_count") > 0
    assert metric(text, "dsv3:e2e_request_latency_seconds_count") > 0
    assert 'dsv3:request_success_total{finished_reason="length",model_name="tiny"}' in text


def test_bench_serve_reports_the_vllm_metric_set(server, tmp_path):
    from dsv3.serve.bench import bench_main

    out = tmp_path / "result.json"
    argv = ["serve", "--base-url", server.url, "--api-key", KEY, "--num-prompts", "8", "--max-concurrency", "4",
            "--random-input-len", "12", "--random-output-len", "4", "--random-range-ratio", "0.5",
            "--random-prefix-len", "3", "--request-rate", "100", "--burstiness", "0.5", "--save-result", str(out),
            "--no-progress"]  # fmt: skip
    assert bench_main(argv) == 0
    s = json.loads(out.read_text())
    assert s["completed"] == 8 and s["failed"] == 0 and s["model"] == MODEL
    lens = [r["output_tokens"] for r in s["requests"]]
    assert s["total_output_tokens"] == sum(lens) and all(2 <= n <= 6 for n in lens)  # 4 +- 50%, eos ignored
    for key in ("ttft", "tpot", "itl", "e2e"):
        assert 0 < s[key]["median_ms"] <= s[key]["p99_ms"]
    assert s["ttft"]["mean_ms"] < s["e2e"]["mean_ms"] and s["output_throughput"] > 0


def test_bench_serve_cli_with_a_jsonl_dataset_and_chat(server, tmp_path):
    import subprocess
    import sys

    data = tmp_path / "prompts.jsonl"
    data.write_text(
        '{"prompt": "def add", "max_tokens": 3}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    cmd = [sys.executable, "-m", "dsv3", "bench", "serve", "--base-url", server.url, "--api-key", KEY, "--dataset",
           "jsonl", "--dataset-path", str(data), "--num-prompts", "4", "--random-output-len", "2", "--no-progress"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "successful requests             4" in r.stdout and "TTFT (ms) mean/median/p99" in r.stdout
    from dsv3.serve.bench import bench_main

    with pytest.raises(OSError, match="none.jsonl"):
        bench_main(
            [
                "serve",
                "--base-url",
                server.url,
                "--dataset",
                "jsonl",
                "--dataset-path",
                str(tmp_path / "none.jsonl"),
            ]
        )
    with pytest.raises(ValueError, match="--random-range-ratio"):
        bench_main(["serve", "--random-range-ratio", "1.5"])
