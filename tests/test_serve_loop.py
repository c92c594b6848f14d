"""The server's engine loop (dsv3.serve.engine_loop) in-process: incremental detokenisation (UTF-8
and stop strings across tokens), outputs equal to `LLM.generate`, abort freeing blocks at once,
all-or-none admission, the bounded admission queue, min_p sampling."""

import asyncio
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3 import ModelConfig, Transformer
from dsv3.data.tokenizer import Tokenizer
from dsv3.infer import LLM, SamplingParams
from dsv3.infer.sampling import target_probs
from dsv3.serve.engine_loop import Detokenizer, EngineLoop, Overloaded

TEXTS = ["def add(a, b):\n    return a + b\n", "To be, or not to be: that is the question. é ü 中文\n"] * 20


class ByteTok:
    """A tokenizer whose token i is the byte string BYTES[i] (decode replaces partial UTF-8)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def _stream(tok, ids: list[int], stop: tuple[str, ...], final: str) -> list[str]:
    """The pieces the loop sends: an update per token, the engine's final text with the last."""
    d = Detokenizer(tok, stop)
    pieces = [d.update(ids[: i + 1]) for i in range(len(ids) - 1)]
    return [*pieces, d.finish(final)]


def test_a_character_split_across_tokens_is_released_whole():
    euro = "€".encode()  # 3 bytes, one per token
    tok = ByteTok([b"a", euro[:1], euro[1:2], euro[2:], b"b"])
    pieces = _stream(tok, [0, 1, 2, 3, 4], (), "a€b")
    assert pieces == ["a", "", "", "€", "b"]
    assert "".join(pieces) == "a€b" and not any("\ufffd" in p for p in pieces)


def test_a_stop_string_straddling_tokens_is_never_streamed():
    tok = ByteTok([b"xx S", b"TO", b"P tail"])
    # the engine stops at token 2 and cuts the text before "STOP"
    pieces = _stream(tok, [0, 1, 2], ("STOP",), "xx ")
    assert pieces == ["xx ", "", ""]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=3), min_size=1, max_size=12),
    st.lists(st.text(alphabet="ab€", min_size=1, max_size=3), max_size=2),
)
def test_streamed_pieces_are_a_prefix_of_the_final_text(chunks, stops):
    """Whatever the bytes and stop strings: pieces released before the end never contain a stop
    string nor an incomplete character, and concatenate (with the last piece) to the final text."""
    tok = ByteTok(chunks)
    ids = list(range(len(chunks)))
    full = tok.decode(ids)
    hits = [i for i in (full.find(s) for s in stops) if i >= 0]
    final = full[: min(hits)] if hits else full
    d = Detokenizer(tok, tuple(stops))
    sent = ""
    for i in range(len(ids)):
        if any(s in tok.decode(ids[: i + 1]) for s in stops):
            break  # the engine stops at this token: its text comes with finish()
        sent += d.update(ids[: i + 1])
    assert final.startswith(sent)
    assert sent + d.finish(final) == final


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    tok = Tokenizer.train(TEXTS, 300, show_progress=False)
    return LLM(Transformer(ModelConfig.from_preset("tiny")), tokenizer=tok, num_blocks=32, block_size=8)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _collect(loop: EngineLoop, ids: list[str]):
    out = {rid: [] for rid in ids}
    async for d in loop.stream(ids):
        out[d.request_id].append(d)
    return out


def test_the_loop_streams_what_generate_returns(llm):
    prompts = [llm.tokenizer.encode("def add(a, b):"), llm.tokenizer.encode("To be")]
    params = [
        SamplingParams(temperature=0, max_tokens=12, stop=("a",)),
        SamplingParams(temperature=0.8, seed=7),
    ]
    expected = llm.generate(prompts, params)

    async def go():
        loop = EngineLoop(llm.engine).start()
        try:
            ids = await loop.add(prompts, params)
            return ids, await _collect(loop, ids)
        finally:
            loop.stop()

    ids, got = _run(go())
    for rid, exp in zip(ids, expected):
        deltas = got[rid]
        assert sum((d.token_ids for d in deltas), []) == exp.token_ids
        assert "".join(d.text for d in deltas) == exp.text
        assert deltas[-1].finished and deltas[-1].finish_reason == exp.finish_reason
        assert all(not d.finished for d in deltas[:-1])


def test_abort_frees_the_blocks_at_once(llm):
    engine = llm.engine
    free = engine.cache.allocator.num_free

    async def go():
        loop = EngineLoop(engine).start()
        try:
            [rid] = await loop.add([[1, 2, 3]], [SamplingParams(max_tokens=200, ignore_eos=True)])
            seen = []
            async for d in loop.stream([rid]):
                seen.append(d)
                if len(seen) == 2:
                    assert engine.cache.allocator.num_free < free  # running: it holds blocks
                    loop.abort(rid)
            return seen
        finally:
            loop.stop()

    seen = _run(go())
    assert seen[-1].finish_reason == "abort" and seen[-1].finished
    assert sum(len(d.token_ids) for d in seen) < 200
    assert engine.cache.allocator.num_free == free and not engine.has_unfinished()


def test_a_bad_request_in_a_group_queues_nothing(llm):
    async def go():
        loop = EngineLoop(llm.engine).start()
        try:
            with pytest.raises(ValueError, match=r"prompts\[1\]: prompt: token ids \[9999\]"):
                await loop.add([[1, 2], [9999]], [SamplingParams()] * 2)
            assert loop.stats().queued_requests == 0
        finally:
            loop.stop()
        assert not llm.engine.has_unfinished()

    _run(go())


def test_an_add_cancelled_while_pending_is_aborted(llm):
    """A handler cancelled (its client gone) while the engine thread has not yet taken its add:
    the request must not run on unseen."""
    import threading
    import time

    engine = llm.engine

    async def go():
        loop = EngineLoop(engine)
        gate, original = threading.Event(), loop._do_add
        loop._do_add = lambda cmd: (gate.wait(10), original(cmd))
        loop.start()
        try:
            task = asyncio.create_task(
                loop.add([[1, 2, 3]], [SamplingParams(max_tokens=200, ignore_eos=True)])
            )
            await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.sleep(0)
            gate.set()
            deadline = time.monotonic() + 10
            while engine.has_unfinished() or loop._inbox.qsize():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert loop.stats().queued_requests == 0 and loop.alive  # the engine thread survived it
        finally:
            loop.stop()

    _run(go())
    assert engine.cache.allocator.num_free == engine.cache.num_blocks


def test_the_admission_queue_is_bounded(llm, monkeypatch):
    # the engine steps only once the full queue has been tried: on a fast machine the first two
    # requests could otherwise get their first token (and leave the queue) before the third arrives
    held, step = threading.Event(), llm.engine.step
    monkeypatch.setattr(llm.engine, "step", lambda *a, **k: (held.wait(30), step(*a, **k))[1])

    async def go():
        loop = EngineLoop(llm.engine, max_queued_requests=2).start()
        try:
            ids = await loop.add([[1, 2], [3, 4]], [SamplingParams(max_tokens=2)] * 2)
            with pytest.raises(Overloaded, match="max-queued-requests 2"):
                await loop.add([[5]], [SamplingParams(max_tokens=2)])
            held.set()
            await _collect(loop, ids)
            more = await loop.add([[5]], [SamplingParams(max_tokens=2)])  # room again once they ran
            await _collect(loop, more)
            assert loop.stats().queued_requests == 0
        finally:
            loop.stop()

    _run(go())


def test_min_p_drops_tokens_below_its_share_of_the_best():
    logits = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
    probs = logits.softmax(-1)[0]
    got = target_probs(logits, [SamplingParams(min_p=0.3)])[0]
    keep = probs >= 0.3 * probs.max()
    assert torch.allclose(got, torch.where(keep, probs, 0) / probs[keep].sum())
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)


def test_the_demo_prints_a_serve_command_and_a_curl_line_that_parse():
    import json
    import shlex
    from pathlib import Path

    from dsv3.demo import serve_hint
    from dsv3.serve.cli import build_parser
    from dsv3.serve.protocol import CompletionRequest

    lines = serve_hint(Path("runs/demo/checkpoints/step_00000500")).strip().splitlines()
    serve, curl = shlex.split(lines[1]), shlex.split(lines[2])
    args = build_parser().parse_args(serve[2:])
    assert serve[:2] == ["dsv3", "serve"] and args.port == 8000 and args.served_model_name == ["demo"]
    assert curl[2] == "http://127.0.0.1:8000/v1/completions"
    body = CompletionRequest.model_validate(json.loads(curl[curl.index("-d") + 1]))
    assert body.model == "demo"


def test_the_server_step_budget_defaults_by_device():
    """`dsv3 serve` without --max-num-batched-tokens: CPU_STEP_TOKENS per step on the CPU (smaller
    prefill steps: earlier first tokens there), the engine's default elsewhere; a given value is kept."""
    from dsv3.infer.engine import EngineConfig
    from dsv3.serve.cli import CPU_STEP_TOKENS, build_parser, engine_options, step_tokens

    assert step_tokens("cpu") == CPU_STEP_TOKENS == 256
    assert step_tokens("cuda:0") == EngineConfig().max_num_batched_tokens
    args = build_parser().parse_args(["ckpt"])
    assert engine_options(args)["max_num_batched_tokens"] == CPU_STEP_TOKENS
    args = build_parser().parse_args(["ckpt", "--max-num-batched-tokens", "96", "--device", "cuda"])
    assert engine_options(args)["max_num_batched_tokens"] == 96
