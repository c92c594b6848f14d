"""The evaluation harness (dsv3.evals): pass@k, multiple-choice scoring against a hand computation
on a tiny model, the code sandbox's limits, task-file errors, loaders, backends and `dsv3 eval --tasks`."""

import itertools
import json
import math
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import save_pretrained
from dsv3.data.tokenizer import Tokenizer
from dsv3.evals import Task, TaskFileError, load_task, mean_stderr, pass_at_k
from dsv3.evals.backends import GenRequest, LocalBackend, OpenAIBackend, server_bos
from dsv3.evals.loaders import bundled_tasks, humaneval_rows, mmlu_rows, resolve_tasks
from dsv3.evals.runner import check_completion, evaluate_task, format_table, score_multiple_choice
from dsv3.evals.sandbox import run_program

TEXTS = ["def add(a, b):\n    return a + b\n", "To be, or not to be: that is the question.\n"] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, 300, show_progress=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny")).eval()


MC_ROWS = [
    {"query": "To be, or not\n", "choices": ["to be", "the question", "a + b"], "answer": 0},
    {"query": "def add(a, b):\n", "choices": ["    return a + b", "To be"], "answer": 0},
    {"query": "that is\n", "choices": ["the question.", "not", "def", "b"], "answer": 1},
]


# ---- metrics ---------------------------------------------------------------------------------------
def test_pass_at_k_equals_its_closed_form_and_the_subset_count():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
                if n <= 6:  # the definition: the share of k-subsets holding a correct sample
                    subsets = list(itertools.combinations(range(n), k))
                    assert pass_at_k(n, c, k) == pytest.approx(
                        sum(min(s) < c for s in subsets) / len(subsets)
                    )
    assert pass_at_k(200, 10, 100) == pytest.approx(1 - math.comb(190, 100) / math.comb(200, 100))
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def test_mean_stderr_is_the_sample_standard_error():
    values = [1.0, 0.0, 1.0, 1.0, 0.0]
    mean, se = mean_stderr(values)
    assert mean == 0.6 and se == pytest.approx(statistics.stdev(values) / math.sqrt(5))


# ---- multiple choice against a hand computation ------------------------------------------------------
def _hand_loglikelihood(model, tok, context: str, choice: str) -> float:
    ctx, cont = [tok.bos_id, *tok.encode(context)], tok.encode(choice)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_multiple_choice_scores_equal_a_hand_computation(model, tok):
    task = Task(name="mc", kind="multiple_choice", rows=MC_ROWS, few_shot=1)
    backend = LocalBackend(model, tok, batch_size=2)  # batches of unequal lengths: padding is exercised
    result = score_multiple_choice(task, backend, range(3))
    hits, hits_norm = [], []
    for i, row in enumerate(MC_ROWS):
        shot = MC_ROWS[1 if i == 0 else 0]  # the first other row, with its correct choice
        context = f"{shot['query']}{shot['choices'][shot['answer']]}\n\n{row['query']}"
        hand = [_hand_loglikelihood(model, tok, context, c) for c in row["choices"]]
        assert result["details"][i]["loglikelihoods"] == pytest.approx(hand, abs=1e-4)
        norm = [v / len(c.encode()) for v, c in zip(hand, row["choices"])]
        hits.append(max(range(len(hand)), key=hand.__getitem__) == row["answer"])
        hits_norm.append(max(range(len(norm)), key=norm.__getitem__) == row["answer"])
    assert result["acc"] == pytest.approx(sum(hits) / 3)
    assert result["acc_norm"] == pytest.approx(sum(hits_norm) / 3)
    assert result["acc_stderr"] == pytest.approx(mean_stderr([float(h) for h in hits])[1])
    assert result["random_baseline"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)


# ---- the sandbox -------------------------------------------------------------------------------------
def test_sandbox_kills_an_infinite_loop_within_its_time_limit():
    t0 = time.perf_counter()
    r = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - t0 < 4.0


def test_sandbox_stops_a_memory_hog_at_its_memory_limit():
    r = run_program("x = bytearray(4 * 2**30)\n", timeout_s=10.0, memory_mb=256)
    assert r.status == "memory" and not r.passed and r.seconds < 5.0
    # the same program without the hog passes: the limit leaves room for the interpreter
    assert run_program("x = bytearray(16 * 2**20)\n", timeout_s=10.0, memory_mb=256).passed


def test_sandbox_runs_in_a_temporary_directory_that_is_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    program = (
        "import os, sys\nopen('stray.txt', 'w').write('x')\nsys.stderr.write(os.getcwd())\nsys.exit(3)\n"
    )
    r = run_program(program)
    cwd = Path(r.stderr)
    assert r.status == "failed" and r.returncode == 3
    assert cwd.name.startswith("dsv3-sandbox-") and cwd.parent == Path(tempfile.gettempdir())
    assert not cwd.exists()  # deleted with the file the program wrote
    assert not (tmp_path / "stray.txt").exists()
    home = run_program("import os, sys\nsys.stderr.write(os.environ['HOME'] + '|' + os.getcwd())\n")
    assert home.stderr.split("|")[0] == home.stderr.split("|")[1]


# ---- task files ----------------------------------------------------------------------------------------
def _write_task(tmp_path, spec_text: str, data_lines: list[str]) -> Path:
    (tmp_path / "d.jsonl").write_text("\n".join(data_lines) + "\n")
    path = tmp_path / "t.task.json"
    path.write_text(spec_text)
    return path


GOOD_ROW = json.dumps(MC_ROWS[0])


@pytest.mark.parametrize(
    "spec, lines, where, what",
    [
        ('{"kind": "multiple_choice",\n "data": "d.jsonl",,}', [GOOD_ROW], "t.task.json:2:", "not valid JSON"),
        ('{"kind": "multiple_choice",\n "data": "d.jsonl",\n "fewshot": 2}', [GOOD_ROW], "t.task.json:3:", "fewshot: unknown field"),
        ('{"kind": "ranking",\n "data": "d.jsonl"}', [GOOD_ROW], "t.task.json:1:", "kind: must be one of"),
        ('{"kind": "generate",\n "data": "d.jsonl",\n "k": [1, 5]}', ['{"prompt": "a", "answer": "b"}'], "t.task.json:3:", "k: each k"),
        ('{"kind": "multiple_choice", "data": "d.jsonl"}', [GOOD_ROW, GOOD_ROW, "{oops"], "d.jsonl:3:", "not valid JSON"),
        ('{"kind": "multiple_choice", "data": "d.jsonl"}', [GOOD_ROW, '{"query": "q", "answer": 0}'], "d.jsonl:2:", "missing field 'choices'"),
        ('{"kind": "multiple_choice", "data": "d.jsonl"}', ['{"query": "q", "choices": ["a", "b"], "answer": 2}'], "d.jsonl:1:", "answer: 2 is not an index"),
        ('{"kind": "generate", "data": "d.jsonl"}', ['{"prompt": "p"}'], "d.jsonl:1:", "missing field 'answer'"),
    ],
)  # fmt: skip
def test_task_file_errors_are_one_line_naming_file_and_line(tmp_path, spec, lines, where, what):
    path = _write_task(tmp_path, spec, lines)
    with pytest.raises(TaskFileError) as e:
        load_task(path)
    message = str(e.value)
    assert "\n" not in message and where in message and what in message


def test_a_bad_task_file_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    from dsv3.cli import main

    path = _write_task(tmp_path, '{"kind": "multiple_choice", "data": "d.jsonl"}', [GOOD_ROW, "[1]"])
    assert main(["eval", "--tasks", str(path), "--server", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0 and err.startswith("dsv3 eval: ") and "d.jsonl:2: expected a JSON object" in err
    )


# ---- bundled smoke tasks and loaders --------------------------------------------------------------------
def test_bundled_smoke_tasks_load_labelled_and_their_references_pass():
    names = set(bundled_tasks())
    assert {"smoke_code", "smoke_fim", "smoke_cloze", "smoke_mc"} <= names
    tasks = {t.name: t for t in resolve_tasks(["smoke"])}
    assert all(t.smoke for t in tasks.values())
    fim = tasks["smoke_fim"]
    for row in fim.rows[:6]:  # the held-out body passes its tests; a wrong one fails them
        assert check_completion(fim, row, row["answer"]), row["source"]
        assert not check_completion(fim, row, "    return None")
    code, reference = tasks["smoke_code"], fim.rows[0]["answer"]
    assert check_completion(code, code.rows[0], reference)
    assert code.run_temperatures() == (0.2, 0.5, 0.8)  # under 1,000 rows: several temperatures


def test_mmlu_csv_layout_gives_five_shot_prompts_and_letters(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "dev").mkdir()
    dev = "".join(f'"dev q{i}?",a{i},b{i},c{i},d{i},B\n' for i in range(6))
    (tmp_path / "dev" / "high_school_physics_dev.csv").write_text(dev)
    (tmp_path / "test" / "high_school_physics_test.csv").write_text(
        '"What, exactly?",w,x,y,z,C\nq2,1,2,3,4,A\n'
    )
    rows = mmlu_rows(tmp_path)
    assert [r["answer"] for r in rows] == [2, 0] and rows[0]["choices"] == [" A", " B", " C", " D"]
    q = rows[0]["query"]
    assert q.startswith(
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
    )
    assert q.count("Answer: B\n\n") == 5 and "dev q5" not in q  # five shots from dev
    assert q.endswith("What, exactly?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    (tmp_path / "test" / "high_school_physics_test.csv").write_text("q,1,2,3,4,A\nq,1,2,3,E\n")
    with pytest.raises(TaskFileError, match=r"high_school_physics_test.csv:2: expected 6 columns"):
        mmlu_rows(tmp_path)


def test_humaneval_jsonl_layout_runs_the_problem_tests(tmp_path):
    problem = {"task_id": "HumanEval/0", "prompt": "def inc(x):\n", "canonical_solution": "    return x + 1\n",
               "test": "def check(f):\n    assert f(1) == 2\n", "entry_point": "inc"}  # fmt: skip
    (tmp_path / "he.jsonl").write_text(json.dumps(problem) + "\n")
    [task] = resolve_tasks([f"humaneval:{tmp_path / 'he.jsonl'}"])
    row = task.rows[0]
    assert task.scoring == "tests" and humaneval_rows(tmp_path / "he.jsonl")[0]["tests"].endswith(
        "check(inc)\n"
    )
    assert check_completion(task, row, problem["canonical_solution"])
    assert not check_completion(task, row, "    return x\n")


# ---- generation scoring -----------------------------------------------------------------------------------
class ScriptedBackend:
    """Answers generation requests from a function of (request, call index)."""

    name = "scripted"

    def __init__(self, answer):
        self.answer, self.requests = answer, []

    def generate(self, requests):
        self.requests += list(requests)
        return [self.answer(r, len(self.requests) - len(requests) + i) for i, r in enumerate(requests)]


def test_generation_pass_at_k_and_the_spread_over_temperatures():
    rows = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    task = Task(
        name="g", kind="generate", rows=rows, samples=4, k=(1, 2), temperatures=(0.0, 1.0), max_tokens=5
    )
    # at T=0 row i gets i correct samples of 4; at T=1 every sample of every row is right
    backend = ScriptedBackend(
        lambda r, n: f"a{r.prompt[1]}" if r.temperature == 1.0 or n % 4 < int(r.prompt[1]) else "x"
    )
    result = evaluate_task(task, backend)
    cold, hot = result["runs"]
    assert cold["pass@1"] == pytest.approx((0 + 1 / 4 + 2 / 4) / 3)
    assert cold["pass@2"] == pytest.approx(sum(pass_at_k(4, c, 2) for c in (0, 1, 2)) / 3)
    assert hot["pass@1"] == 1.0
    assert result["pass@1"]["mean"] == pytest.approx((cold["pass@1"] + 1.0) / 2)
    assert result["pass@1"]["std"] == pytest.approx(statistics.stdev([cold["pass@1"], 1.0]))
    assert all(r.max_tokens == 5 for r in backend.requests) and len(backend.requests) == 3 * 4 * 2
    assert len({r.seed for r in backend.requests}) == len(backend.requests)  # every sample its own seed
    assert "g" in format_table([result])


def test_first_word_exact_match_and_fim_requests():
    task = Task(name="c", kind="generate", rows=[{"prompt": "p", "answer": "mow"}], extract="first_word")
    assert check_completion(task, task.rows[0], " mow. And more")
    assert not check_completion(task, task.rows[0], " mowing")
    fim = Task(
        name="f", kind="fim", rows=[{"prefix": "A", "suffix": "C", "answer": "B"}], temperatures=(0.0,)
    )
    backend = ScriptedBackend(lambda r, n: "B\n")
    assert evaluate_task(fim, backend)["pass@1"]["mean"] == 1.0
    assert backend.requests[0].prompt == "A" and backend.requests[0].suffix == "C"


def test_local_generation_goes_through_the_engine_in_one_batch(model, tok, monkeypatch):
    from dsv3.data.fim import fim_prompt
    from dsv3.infer import LLM, SamplingParams

    backend = LocalBackend(model, tok)
    llm = backend._engine()
    seen = []
    add = llm.engine.add_requests
    monkeypatch.setattr(llm.engine, "add_requests", lambda p, params: seen.append(p) or add(p, params))
    texts = backend.generate([GenRequest("def add", 0.0, 6), GenRequest("def ", 0.0, 6, suffix=" b\n")])
    assert len(seen) == 1 and seen[0][1] == fim_prompt(tok, "def ", " b\n")
    ref = LLM(model, tokenizer=tok).generate(
        [[tok.bos_id, *tok.encode("def add")]], SamplingParams(0.0, max_tokens=6)
    )
    assert texts[0] == ref[0].text


# ---- the OpenAI-compatible backend against a fake server ----------------------------------------------
class FakeCompletions(BaseHTTPRequestHandler):
    """/v1/completions over a tiny model: echo + logprobs as an OpenAI server answers them."""

    model = tok = None
    bodies: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeCompletions.bodies.append(body)
        tok, prompt = self.tok, body["prompt"]
        ids = tok.encode(prompt)  # as dsv3 serve: no bos added, special-token text read as the token
        if body.get("echo"):
            with torch.no_grad():
                logp = torch.log_softmax(self.model(torch.tensor([ids[:-1]])).float(), -1)[0]
            lps = [None] + [float(logp[j - 1, t]) for j, t in enumerate(ids) if j > 0]
            # the OpenAI API reports no logprob for the first prompt token
            offsets = [len(tok.decode(ids[:j])) for j in range(len(ids))]
            choice = {"text": prompt, "logprobs": {"token_logprobs": lps, "text_offset": offsets}}
        else:
            choice = {"text": "  return 1\ndef more():\n"}
        out = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):  # /tokenizer_info, as dsv3 serve and vLLM answer it
        info = {"bos_token": self.tok.bos_token, "add_bos_token": False}
        out = json.dumps(info).encode() if self.path == "/tokenizer_info" else b"{}"
        self.send_response(200 if self.path == "/tokenizer_info" else 404)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(model, tok):
    FakeCompletions.model, FakeCompletions.tok, FakeCompletions.bodies = model, tok, []
    httpd = HTTPServer(("127.0.0.1", 0), FakeCompletions)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def test_openai_backend_scores_multiple_choice_as_the_local_model_does(server, model, tok):
    # contexts end in a newline: tokenized jointly or apart, the continuation's tokens are the same
    requests = [(r["query"], c) for r in MC_ROWS for c in r["choices"]]
    for ctx, cont in requests:
        assert tok.encode(ctx + cont) == tok.encode(ctx) + tok.encode(cont)
    local = LocalBackend(model, tok).loglikelihood(requests)
    bos = server_bos(server)  # the server adds none: the backend sends it, as LocalBackend scores it
    assert bos == tok.bos_token and server_bos("http://127.0.0.1:9", timeout_s=2) is None
    remote = OpenAIBackend(server, bos=bos).loglikelihood(requests)
    assert remote == pytest.approx(local, abs=1e-4)
    body = FakeCompletions.bodies[0]
    assert body["echo"] is True and body["max_tokens"] == 0 and body["prompt"].startswith(tok.bos_token)
    without = OpenAIBackend(server).loglikelihood(requests)  # no bos: a different (worse-posed) score
    assert max(abs(a - b) for a, b in zip(without, local)) > 1e-3
    task = Task(name="mc", kind="multiple_choice", rows=MC_ROWS)
    assert (
        evaluate_task(task, OpenAIBackend(server, bos=bos))["acc"]
        == evaluate_task(task, LocalBackend(model, tok))["acc"]
    )


def test_openai_backend_generation_cuts_at_stop_and_sends_fim_markers(server):
    backend = OpenAIBackend(server + "/v1")
    [text] = backend.generate([GenRequest("def f():\n", 0.5, 9, stop=("\ndef",), seed=3, suffix="\n")])
    body = FakeCompletions.bodies[-1]
    assert text == "  return 1"
    assert body["prompt"] == "<｜fim▁begin｜>def f():\n<｜fim▁hole｜>\n<｜fim▁end｜>"
    assert body["temperature"] == 0.5 and body["max_tokens"] == 9 and body["seed"] == 3


def test_an_unreachable_server_is_a_one_line_error():
    from dsv3.evals.backends import BackendError

    with pytest.raises(BackendError, match="cannot reach the server"):
        OpenAIBackend("http://127.0.0.1:9", timeout_s=2).loglikelihood([("a", "b")])


# ---- the command line ---------------------------------------------------------------------------------
def test_eval_tasks_on_a_checkpoint_writes_a_report(tmp_path, model, tok, capsys):
    from dsv3.cli import main

    ckpt = tmp_path / "ckpt"
    save_pretrained(model, ckpt)
    tok.save(ckpt)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (tmp_path / "mc.task.json").write_text('{"kind": "multiple_choice", "data": "d.jsonl", "few_shot": 1}')
    report = tmp_path / "r.json"
    argv = ["eval", "--tasks", f"{tmp_path / 'mc.task.json'},smoke_cloze", "--ckpt", str(ckpt), "--limit", "2",
            "--temperatures", "0", "--report", str(report), "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    data = json.loads(report.read_text())
    assert [t["task"] for t in data["tasks"]] == ["mc", "smoke_cloze"] and data["backend"] == "local"
    assert data["tasks"][0]["n"] == 2 and data["tasks"][1]["runs"][0]["temperature"] == 0.0
    assert "smoke_cloze [smoke]" in out and "acc" in out


def test_eval_without_tasks_is_still_the_validation_loss(tmp_path, capsys):
    from dsv3.cli import main

    assert main(["eval", "--ckpt", str(tmp_path)]) == 2
    assert "trainer.json: not found" in capsys.readouterr().err


def test_command_line_overrides_of_samples_and_k(tmp_path, capsys):
    from dsv3.cli import main

    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "answer": "a"}\n')
    (tmp_path / "g.task.json").write_text('{"kind": "generate", "data": "d.jsonl"}')
    argv = [
        "eval",
        "--tasks",
        str(tmp_path / "g.task.json"),
        "--server",
        "http://127.0.0.1:9",
        "--samples",
        "2",
    ]
    assert main([*argv, "--k", "1,3"]) == 2
    assert "--k 1,3: each k must be in [1, samples=2]" in capsys.readouterr().err


def test_too_long_prompts_keep_their_opening_tokens():
    from dsv3.evals.backends import keep_head

    assert keep_head([0, 1, 2, 3, 4, 5], 1, 4) == [0, 3, 4, 5]
    assert keep_head([0, 9, 2, 3, 4, 5], 2, 4) == [0, 9, 4, 5]
    assert keep_head([0, 1], 1, 4) == [0, 1]
