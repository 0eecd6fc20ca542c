"""`ptv2 serve`: a real server process, a real HTTP client (httpx). Mixed prompts answer as `ptv2 predict` does,
prompts load and unload while requests run, every bad input gets a one-line 4xx, SIGTERM answers what is in
flight."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import FIXTURES, RTE, SMOKE, TINY_BERT, free_port, ptv2, start_ptv2

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

SQUAD = FIXTURES / "squad"
COPA = FIXTURES / "superglue" / "COPA"
TAGGING = FIXTURES / "tagging"
CONLL = "conll03_iob1.txt"
NER = ["task=conll03", f"task.data_dir={TAGGING}", f"task.files={{train: {CONLL}, dev: {CONLL}, test: {CONLL}}}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Tiny runs of four task types on one backbone: two RTE prompts (one with the MLP reparameterization), NER,
    SQuAD and COPA (multiple choice: its rows run in a forward of their own); and, in a folder of its own, a
    prompt-tuning run (an input prompt: it cannot mix)."""
    root = tmp_path_factory.mktemp("serve-runs")
    ptv2("train", *SMOKE, "logger=none", "prompt.length=3", f"hydra.run.dir={root / 'runs' / 'a'}")
    mlp = ["prompt.length=5", "prompt.projection=mlp"]
    ptv2("train", *SMOKE, "logger=none", *mlp, f"hydra.run.dir={root / 'runs' / 'b'}")
    ptv2("train", "backbone=tiny", "trainer=smoke", "logger=none", *NER, f"hydra.run.dir={root / 'runs' / 'ner'}")
    squad = ["task=squad", f"task.data_dir={SQUAD}", "task.max_length=192", "task.options.stride=32"]
    ptv2("train", "backbone=tiny", "trainer=smoke", "logger=none", *squad, f"hydra.run.dir={root / 'runs' / 'qa'}")
    copa = ["task=copa", f"task.data_dir={COPA}"]
    ptv2("train", "backbone=tiny", "trainer=smoke", "logger=none", *copa, f"hydra.run.dir={root / 'runs' / 'copa'}")
    ptv2("train", *SMOKE, "logger=none", "prompt=prompt_tuning", f"hydra.run.dir={root / 'other' / 'pt'}")
    deeper = root / "deeper-bert"  # the tiny BERT with a third layer: another backbone
    shutil.copytree(TINY_BERT, deeper)
    (deeper / "config.json").write_text(
        json.dumps({**json.loads((TINY_BERT / "config.json").read_text()), "num_hidden_layers": 3})
    )
    deep = [f"backbone.name_or_path={deeper}", "backbone.name=deeper"]
    ptv2("train", *SMOKE, "logger=none", *deep, f"hydra.run.dir={root / 'other' / 'deep'}")
    return root


class Server:
    """`ptv2 serve ARGS` in a process of its own on a free loopback port; stopped by SIGTERM."""

    def __init__(self, tmp_path: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = start_ptv2("serve", *args, f"serve.port={self.port}", f"hydra.run.dir={tmp_path / 'serve'}")
        self.client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not answer /health within 120 s")

    def predict(self, name: str, records: list, client=None) -> httpx.Response:
        return (client or self.client).post(f"/prompts/{name}/predict", json={"records": records})

    def stop(self):
        self.client.close()
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def rte_records() -> list[dict]:
    lines = (RTE / "test.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k in ("premise", "hypothesis")} for line in lines]


def test_mixed_prompts_answer_as_predict_does(runs, tmp_path):
    """Concurrent requests for five prompts of four task types share backbone forwards; every answer equals the
    same record through `ptv2 predict` (labels, tags and answers exactly; probabilities to 1e-4)."""
    from ptv2.data import squad, tagging

    expected = {}
    for name in ("a", "b"):
        out = tmp_path / f"predict-{name}"
        ptv2("predict", str(runs / "runs" / name), f"input={RTE / 'test.jsonl'}", f"hydra.run.dir={out}")
        expected[name] = [json.loads(line) for line in (out / "rte-scores.jsonl").read_text().splitlines()]
    out = tmp_path / "predict-copa"
    ptv2("predict", str(runs / "runs" / "copa"), f"input={COPA / 'val.jsonl'}", f"hydra.run.dir={out}")
    expected["copa"] = [json.loads(line) for line in (out / "copa-scores.jsonl").read_text().splitlines()]
    out = tmp_path / "predict-ner"
    ptv2("predict", str(runs / "runs" / "ner"), f"input={TAGGING / CONLL}", f"hydra.run.dir={out}")
    expected_tags = [
        json.loads(line)["tags"] for line in (out / "conll03-test-predictions.jsonl").read_text().split("\n") if line
    ]
    out = tmp_path / "predict-qa"
    ptv2("predict", str(runs / "runs" / "qa"), "split=dev", f"task.data_dir={SQUAD}", f"hydra.run.dir={out}")
    expected_answers = json.loads((out / "squad-dev-predictions.json").read_text())

    sentences = tagging.read_conll_ner(TAGGING / CONLL)
    questions = squad.read_official(SQUAD / "dev-v1.1.json")
    jobs = [("a", [record]) for record in rte_records()] + [("b", [record]) for record in rte_records()]
    jobs += [("ner", [{"tokens": sentence["tokens"]}]) for sentence in sentences]
    copa_lines = [json.loads(line) for line in (COPA / "val.jsonl").read_text().splitlines()]
    jobs += [("copa", [{k: v for k, v in line.items() if k not in ("idx", "label")}]) for line in copa_lines]
    jobs += [("qa", [{"question": q["question"], "context": q["context"], "id": q["id"]}]) for q in questions]
    server = Server(tmp_path, f"runs={runs / 'runs'}", "serve.max_wait_ms=200", "serve.max_batch=64")
    try:
        listed = {prompt["name"]: prompt for prompt in server.client.get("/prompts").json()}
        assert set(listed) == {"a", "b", "ner", "qa", "copa"}
        with ThreadPoolExecutor(len(jobs)) as threads:
            responses = list(threads.map(lambda job: server.predict(*job), jobs))
        metrics = server.client.get("/metrics").text
    finally:
        result = server.stop()
    assert result.returncode == 0, result.stderr[-2000:]
    by_prompt: dict[str, list] = {}
    for (name, _), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["prompt"] == name and body["run_id"] == listed[name]["run_id"]
        by_prompt.setdefault(name, []).append(body["predictions"][0])
    for name in ("a", "b", "copa"):
        for served, wanted in zip(by_prompt[name], expected[name], strict=True):
            assert served["label"] == wanted["label"]
            assert served["scores"] == pytest.approx(wanted["scores"], abs=1e-4)
    assert [served["tags"] for served in by_prompt["ner"]] == expected_tags
    assert {q["id"]: served["answer"] for q, served in zip(questions, by_prompt["qa"], strict=True)} == expected_answers
    # Requests coalesced: fewer backbone batches than requests, so some batch mixed several prompts' rows.
    batches = float(
        next(line.split()[-1] for line in metrics.splitlines() if line.startswith("ptv2_batch_examples_count"))
    )
    assert 1 <= batches < len(jobs)


def test_load_and_unload_while_requests_run(runs, tmp_path):
    server = Server(tmp_path, f"ckpt=[{runs / 'runs' / 'a'}]", "serve.max_wait_ms=20")
    statuses: list[int] = []
    stop = threading.Event()

    def steady():
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(200):  # bounded; stops as soon as the main thread is done
                if stop.is_set():
                    return
                statuses.append(server.predict("a", rte_records()[:1], client).status_code)

    worker = threading.Thread(target=steady)
    worker.start()
    try:
        loaded = server.client.post("/prompts", json={"name": "b2", "checkpoint": str(runs / "runs" / "b")})
        assert loaded.status_code == 201, loaded.text
        assert loaded.json()["run_id"].startswith("b@")
        assert server.predict("b2", rte_records()).status_code == 200
        assert server.client.delete("/prompts/b2").status_code == 200
        gone = server.predict("b2", rte_records())
        assert gone.status_code == 404 and "no prompt named b2" in gone.json()["error"]
        names = [prompt["name"] for prompt in server.client.get("/prompts").json()]
        assert names == ["a"]
        schemas = server.client.get("/openapi.json").json()["components"]["schemas"]
        described = {
            name: [f for f, v in schema["properties"].items() if not v.get("description")]
            for name, schema in schemas.items()
            if name in ("PredictBody", "LoadBody", "Prediction", "PredictResponse", "PromptInfo")
        }
        assert len(described) == 5 and not any(described.values()), described  # every field described
    finally:
        stop.set()
        worker.join(60)
        server.stop()
    assert statuses and set(statuses) == {200}


BAD = [
    # (what is wrong, request kwargs, status, a phrase of the error)
    ("unknown prompt", dict(url="/prompts/nope/predict", json={"records": [{}]}), 404, "no prompt named nope"),
    ("malformed JSON", dict(url="/prompts/a/predict", content=b'{"records": [', json=None), 400, "malformed JSON"),
    ("missing field", dict(url="/prompts/a/predict", json={"records": [{"premise": "x"}]}), 422, "'hypothesis'"),
    ("no records key", dict(url="/prompts/a/predict", json={"rows": []}), 422, "records: Field required"),
    ("not JSON", dict(url="/prompts/a/predict", content=b"records=1", json=None, headers={}), 415, "Content-Type"),
    (
        "too many tokens",
        dict(url="/prompts/a/predict", json={"records": [{"premise": "a " * 300, "hypothesis": "b"}]}),
        413,
        "serve.max_tokens",
    ),
    (
        "too many records",
        dict(url="/prompts/a/predict", json={"records": [{"premise": "a", "hypothesis": "b"}] * 9}),
        413,
        "serve.max_records",
    ),
    (
        "oversized body",
        dict(url="/prompts/a/predict", json={"records": [{"premise": "a" * 5000, "hypothesis": "b"}]}),
        413,
        "serve.max_body_bytes",
    ),
    ("a tagging record", dict(url="/prompts/a/predict", json={"records": [{"tokens": ["a"]}]}), 422, "missing field"),
    (
        "load outside the roots",
        dict(url="/prompts", json={"name": "x", "checkpoint": "/etc"}),
        403,
        "outside the folders",
    ),
    ("load an input prompt", None, 422, "cannot share this server's backbone"),
    ("load another backbone's prompt", None, 422, "not the one this server holds"),
    ("load under a bad name", dict(url="/prompts", json={"name": "x/y", "checkpoint": "/tmp"}), 422, "valid name"),
]


def test_bad_input_gets_one_line_4xx_and_disturbs_no_one(runs, tmp_path):
    server = Server(
        tmp_path,
        f"ckpt=[{runs / 'runs' / 'a'},{runs / 'runs' / 'b'}]",
        "serve.max_tokens=200",
        "serve.max_records=8",
        "serve.max_body_bytes=4096",
        "serve.max_wait_ms=100",
    )
    copies = {name: runs / "runs" / f"{name}-copy" for name in ("pt", "deep")}
    for name, copy in copies.items():
        copy.mkdir()
        shutil.copy(runs / "other" / name / "prompt.safetensors", copy)
    good = rte_records()
    try:
        with ThreadPoolExecutor(2 * len(BAD)) as threads:
            goods = [threads.submit(server.predict, "b", good) for _ in BAD]
            bads = []
            for what, kwargs, _, _ in BAD:
                if kwargs is None:  # a copy inside the folder the server loads from: only its content refuses it
                    name = "pt" if "input prompt" in what else "deep"
                    kwargs = dict(url="/prompts", json={"name": name, "checkpoint": str(copies[name])})
                kwargs = dict(kwargs)
                headers = kwargs.pop("headers", {"content-type": "application/json"})
                bads.append(threads.submit(server.client.post, headers=headers, **kwargs))
            answers = [future.result() for future in goods]
            refusals = [future.result() for future in bads]
        assert server.client.get("/health").json() == {"status": "ok", "prompts": 2}
    finally:
        result = server.stop()
        for copy in copies.values():
            shutil.rmtree(copy)
    for (what, _, status, phrase), response in zip(BAD, refusals, strict=True):
        assert response.status_code == status, f"{what}: {response.status_code} {response.text}"
        body = response.json()
        assert list(body) == ["error"] and "\n" not in body["error"] and phrase in body["error"], f"{what}: {body}"
        assert "Traceback" not in response.text
    assert [response.status_code for response in answers] == [200] * len(BAD)
    assert len({json.dumps(response.json()["predictions"]) for response in answers}) == 1  # all alike
    assert result.returncode == 0 and "Traceback" not in result.stderr


def test_sigterm_answers_the_requests_in_flight(runs, tmp_path):
    """SIGTERM while requests wait in the batcher (a 1.5 s batching window): every one of them is answered, then the
    process ends with code 0."""
    server = Server(tmp_path, f"runs={runs / 'runs'}", "serve.max_wait_ms=1500", "serve.max_batch=64")
    with ThreadPoolExecutor(6) as threads:
        futures = [threads.submit(server.predict, name, rte_records()) for name in ("a", "b") * 3]
        time.sleep(0.5)  # the requests are in, waiting for their batch
        server.process.send_signal(signal.SIGTERM)
        responses = [future.result() for future in futures]
    result = server.process.wait(timeout=60)
    server.client.close()
    assert [response.status_code for response in responses] == [200] * 6
    assert result.returncode == 0, result.stderr[-2000:]
    assert "server stopped (SIGTERM)" in result.stdout + result.stderr


def test_start_refuses_what_cannot_share_a_backbone(runs, tmp_path):
    mixed = ptv2(
        "serve", f"ckpt=[{runs / 'runs' / 'a'},{runs / 'other' / 'pt'}]", f"hydra.run.dir={tmp_path / 's'}", check=False
    )
    assert mixed.returncode == 2
    assert "prompt.method=prompt_tuning" in mixed.stderr and "serve it alone" in mixed.stderr
    nothing = ptv2("serve", f"hydra.run.dir={tmp_path / 'n'}", check=False)
    assert nothing.returncode == 2 and "ptv2 serve needs prompts" in nothing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    none = ptv2("serve", f"runs={empty}", f"hydra.run.dir={tmp_path / 'e'}", check=False)
    assert none.returncode == 2 and "no prompt.safetensors under" in none.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        busy = ptv2(
            "serve", f"runs={runs / 'runs'}", f"serve.port={port}", f"hydra.run.dir={tmp_path / 'b'}", check=False
        )
    assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    assert not (tmp_path / "b").exists()  # a refused start leaves no run folder


def test_an_input_prompt_is_served_alone(runs, tmp_path):
    """A single prompt-tuning checkpoint: served alone (its own forward), and nothing more can join it."""
    server = Server(tmp_path, f"ckpt={runs / 'other' / 'pt'}")
    try:
        answer = server.predict("pt", rte_records())
        joined = server.client.post("/prompts", json={"name": "pt2", "checkpoint": str(runs / "other" / "pt")})
    finally:
        server.stop()
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3
    assert joined.status_code == 422 and "serves one checkpoint alone" in joined.json()["error"]


def test_generation_answers_as_predict_does(tmp_path):
    """A decoder's generation prompt: the greedy answers of `ptv2 predict` on the same prompts."""
    decoders = FIXTURES / "decoders"
    backbone = [f"backbone.name_or_path={decoders / 'llama'}", f"backbone.tokenizer={decoders / 'tokenizer'}"]
    task = ["task=generation", f"task.data_dir={FIXTURES / 'generation'}", "task.options.max_new_tokens=4"]
    run = tmp_path / "runs" / "gen"
    smoke = ["backbone=tiny", "backbone.name=tiny-llama", "trainer=smoke", "logger=none", "prompt.length=4"]
    ptv2("train", *smoke, *backbone, *task, f"hydra.run.dir={run}")
    ptv2(
        "predict",
        str(run),
        *backbone,
        "split=dev",
        f"task.data_dir={FIXTURES / 'generation'}",
        f"hydra.run.dir={tmp_path / 'p'}",
    )
    expected = [
        json.loads(line) for line in (tmp_path / "p" / "generation-dev-generations.jsonl").read_text().splitlines()
    ]
    server = Server(tmp_path, f"ckpt={run}", *backbone)
    try:
        response = server.predict("gen", [{"prompt": line["prompt"]} for line in expected])
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    assert [p["text"] for p in response.json()["predictions"]] == [line["prediction"] for line in expected]


def test_runtime_loads_read_from_the_runs_folder_never_from_the_root(tmp_path):
    from omegaconf import OmegaConf

    from ptv2.commands.serve import load_roots

    cfg = OmegaConf.create({"runs": None})
    nested = {"a": tmp_path / "runs" / "a" / "prompt.safetensors", "b": tmp_path / "runs" / "b" / "prompt.safetensors"}
    assert load_roots(cfg, nested) == [(tmp_path / "runs").resolve()]
    top = {"a": Path("/a/prompt.safetensors")}
    assert load_roots(cfg, top) == [Path("/a")]  # the run folder itself, not the whole file system
    assert load_roots(OmegaConf.create({"runs": str(tmp_path)}), nested) == [tmp_path.resolve()]
