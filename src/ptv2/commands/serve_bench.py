"""`ptv2 bench serve`: an HTTP load test of `ptv2 serve` with one prompt against M prompts mixed.

It writes bench.prompts synthetic prompts of the command's config (backbone, task, prompt method and length; random
prefixes and heads: speed and memory do not depend on trained values) as checkpoints in the run folder, starts
`ptv2 serve` on them in a process of its own on a free loopback port, and sends bench.requests requests (one record
each: a sentence pair of 8 to 40 words) over bench.connections concurrent connections (httpx), all to one prompt
and spread over the M prompts, in ROUNDS rounds that alternate which goes first; the same records in both.
Then it loads prompts at runtime up to bench.resident and reads the server's resident memory (RSS) before and
after: the memory per 100 prompts. The prompts' checkpoints are removed at the end (bench.json keeps the figures).
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from ptv2.errors import UserError
from ptv2.io import declare, open_stream, write_json
from ptv2.runs import checkpoint

log = logging.getLogger("ptv2")
OUTPUTS = declare("bench", "server-output.txt", "server/*", "server/.hydra/*.yaml", "prompts/*", "prompts/*/*")
ROUNDS = 4  # one-prompt and mixed runs, alternating which goes first; the figures are the medians
WORDS = "the a man woman child dog city river market old new small large red quiet walks sees holds near under".split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_prompts(cfg: DictConfig, folder: Path, numbers: range) -> int:
    """Checkpoints p<number> of random prompts (each seeded by its number) on the command's backbone; returns the
    bytes of one prompt's tensors (prefix and head)."""
    from ptv2.serving import load_backbone, model_for

    encoder, tokenizer, parts = load_backbone(cfg)
    model = model_for(cfg, encoder, tokenizer, parts)
    own = [p for p in model.parameters() if p.requires_grad]
    labels = {cfg.task.name: [str(label) for label in cfg.task.labels]}
    for number in numbers:
        generator = torch.Generator().manual_seed(cfg.trainer.seed + number)
        with torch.no_grad():
            for parameter in own:
                parameter.normal_(0, 0.5, generator=generator)
        path = folder / f"p{number:04d}" / checkpoint.FILENAME
        path.parent.mkdir(parents=True)
        checkpoint.save(path, model, cfg, labels)
    return sum(p.numel() * p.element_size() for p in own)


def records(count: int, seed: int) -> list[dict]:
    draw = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(draw.choice(WORDS) for _ in range(draw.randint(low, high))).capitalize() + "."

    return [{"premise": sentence(8, 30), "hypothesis": sentence(4, 10)} for _ in range(count)]


async def load_test(url: str, names: list[str], sent: list[dict], connections: int) -> dict:
    """Every record to the prompts named round-robin, `connections` at a time; requests/s and latency."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    queue = list(enumerate(sent))
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker():
            while queue:
                number, record = queue.pop()
                name = names[number % len(names)]
                started = time.perf_counter()
                response = await client.post(f"/prompts/{name}/predict", json={"records": [record]})
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        wall = time.perf_counter() - started
    if failures:
        raise UserError(f"bench serve: {len(failures)} requests failed, e.g. {failures[0]}")
    ordered = sorted(latencies)
    return {
        "prompts": len(names),
        "requests": len(sent),
        "wall_seconds": wall,
        "requests_per_second": len(sent) / wall,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def resident_bytes(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


class ServerProcess:
    """`ptv2 serve ckpt=[RUN,...]` in a process of its own, its output in the run folder; it may load the other
    prompts of the runs' folder at runtime."""

    def __init__(self, cfg: DictConfig, runs: list[Path], run_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        serve = cfg.serve
        args = [f"ckpt=[{','.join(map(str, runs))}]", f"serve.port={self.port}", f"serve.max_batch={serve.max_batch}"]
        args += [f"serve.max_wait_ms={serve.max_wait_ms}", f"hydra.run.dir={run_dir / 'server'}"]
        if cfg.bench.threads:
            args.append(f"serve.threads={cfg.bench.threads}")
        self.log = open_stream(run_dir / "server-output.txt")  # the server process writes it until it stops
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ptv2", "serve", *args], stdout=self.log, stderr=self.log
        )

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"bench serve: the server exited ({self.process.returncode}); see server-output.txt")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        raise UserError(f"bench serve: the server did not answer within {timeout:.0f} s; see server-output.txt")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


def load_more(url: str, folder: Path, start: int, count: int) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=120) as client:
        for number in range(start, count):
            response = client.post(
                "/prompts", json={"name": f"p{number:04d}", "checkpoint": str(folder / f"p{number:04d}")}
            )
            if response.status_code != 201:
                raise UserError(f"bench serve: loading prompt {number} failed: {response.text[:200]}")


def run(cfg: DictConfig, run_dir: Path) -> dict:
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise UserError("ptv2 bench serve needs the serve extra: pip install 'ptv2[serve]'") from None
    bench = cfg.bench
    if bench.resident < bench.prompts:
        raise UserError(f"bench.resident={bench.resident} is below bench.prompts={bench.prompts}; raise it")
    folder = run_dir / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    log.info("bench serve: writing %d synthetic prompts ...", bench.resident)
    prompt_bytes = write_prompts(cfg, folder, range(bench.resident))
    sent = records(bench.requests, cfg.trainer.seed)
    server = ServerProcess(cfg, [folder / f"p{number:04d}" for number in range(bench.prompts)], run_dir)
    try:
        server.wait_ready()
        names = [f"p{number:04d}" for number in range(bench.prompts)]
        asyncio.run(load_test(server.url, names, records(2 * bench.connections, 1), bench.connections))  # warm-up
        rounds = []
        for number in range(ROUNDS):  # one prompt first, then mixed first: a drifting load favours neither
            order = ("one", "mixed") if number % 2 == 0 else ("mixed", "one")
            targets = {"one": names[:1], "mixed": names}
            rounds.append(
                {run: asyncio.run(load_test(server.url, targets[run], sent, bench.connections)) for run in order}
            )
            one, mixed = rounds[-1]["one"], rounds[-1]["mixed"]
            log.info(
                "bench serve: one prompt %.1f req/s, %d mixed %.1f req/s",
                one["requests_per_second"],
                bench.prompts,
                mixed["requests_per_second"],
            )
        rss_start = resident_bytes(server.process.pid)
        log.info("bench serve: loading prompts %d to %d at runtime ...", bench.prompts, bench.resident)
        load_more(server.url, folder, bench.prompts, bench.resident)
        rss_resident = resident_bytes(server.process.pid)
        everyone = [f"p{number:04d}" for number in range(bench.resident)]
        spread = asyncio.run(load_test(server.url, everyone, sent, bench.connections))
    finally:
        code = server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    one_rate = statistics.median(r["one"]["requests_per_second"] for r in rounds)
    mixed_rate = statistics.median(r["mixed"]["requests_per_second"] for r in rounds)
    result = {
        "backbone": cfg.backbone.name,
        "task": cfg.task.name,
        "prompt_method": cfg.prompt.method,
        "prompt_length": cfg.prompt.length,
        "connections": bench.connections,
        "max_batch": cfg.serve.max_batch,
        "max_wait_ms": cfg.serve.max_wait_ms,
        "threads": torch.get_num_threads() if not bench.threads else bench.threads,
        "rounds": rounds,
        "one_prompt_rps": one_rate,
        "mixed_rps": mixed_rate,
        "mixed_over_one": mixed_rate / one_rate,
        f"spread_over_{bench.resident}": spread,
        "rss_bytes": {str(bench.prompts): rss_start, str(bench.resident): rss_resident},
        "rss_per_100_prompts_bytes": 100 * (rss_resident - rss_start) / (bench.resident - bench.prompts),
        "prompt_tensor_bytes": prompt_bytes,
        "server_exit_code": code,
    }
    write_json(run_dir / "bench.json", result)
    print(table(result, bench))
    return result


def table(result: dict, bench) -> str:
    def row(label: str, runs: list[dict]) -> str:
        rate = statistics.median(r["requests_per_second"] for r in runs)
        p50 = statistics.median(r["p50_ms"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        return f"| {label} | {runs[0]['prompts']} | {rate:.1f} | {p50:.1f} | {p99:.1f} |"

    spread = result[f"spread_over_{bench.resident}"]
    mib = 2**20
    lines = [
        f"ptv2 bench serve: {result['backbone']}, {result['task']}, {result['prompt_method']} "
        f"P={result['prompt_length']}, {bench.connections} connections, {bench.requests} requests per run, "
        f"max_batch={result['max_batch']}, max_wait_ms={result['max_wait_ms']}",
        "",
        "| run | prompts | requests/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
        row("one prompt", [r["one"] for r in result["rounds"]]),
        row(f"{bench.prompts} prompts mixed", [r["mixed"] for r in result["rounds"]]),
        row(f"{bench.resident} prompts mixed", [spread]),
        "",
        f"mixed / one prompt throughput: {result['mixed_over_one']:.3f} (medians of {len(result['rounds'])} rounds)",
        f"resident memory: {result['rss_bytes'][str(bench.prompts)] / mib:.0f} MiB with {bench.prompts} prompts, "
        f"{result['rss_bytes'][str(bench.resident)] / mib:.0f} MiB with {bench.resident}: "
        f"{result['rss_per_100_prompts_bytes'] / mib:.1f} MiB per 100 prompts "
        f"(prefix + head tensors: {100 * result['prompt_tensor_bytes'] / mib:.1f} MiB per 100)",
    ]
    return "\n".join(lines)
