"""`ptv2 serve ckpt=[RUN_A,RUN_B,...]` or `ptv2 serve runs=DIR`: trained prompts behind one HTTP endpoint.

One frozen backbone holds every prompt (PromptServer); requests for any mix of prompts are batched into one
backbone forward (serve_batcher), answered over FastAPI + uvicorn (serve_app). A checkpoint that cannot share a
backbone (fine-tuning, input-prompt methods, LoRA) is served alone when it is the only one, else refused at start.
The server keeps no state beyond its prompt set, so replicas behind a load balancer answer alike (docs/serving.md).
"""

from __future__ import annotations

import logging
import signal
import socket
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ptv2.checks import check_name
from ptv2.commands.predict import checkpoint_paths
from ptv2.errors import UserError
from ptv2.io import declare, write_json
from ptv2.runs import checkpoint
from ptv2.runs.checkpoint import checkpoint_config

log = logging.getLogger("ptv2")
OUTPUTS = declare("serve", "config.yaml", ".hydra/*.yaml", "serve.log", "serve.json")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def prompt_paths(cfg: DictConfig) -> dict[str, Path]:
    """{name: checkpoint file} of ckpt= (named by run folder) or of every checkpoint under runs=DIR (named by its
    folder's path inside DIR, '/' as '-')."""
    if cfg.runs and cfg.ckpt:
        raise UserError("ckpt= and runs= both name what to serve; give one of them")
    if cfg.runs:
        root = Path(cfg.runs).expanduser()
        if not root.is_dir():
            raise UserError(f"runs={cfg.runs} is not a folder: pass a folder that holds run folders")
        found = sorted(root.rglob(checkpoint.FILENAME))
        if not found:
            raise UserError(f"no {checkpoint.FILENAME} under {root}: train a prompt there first (ptv2 train ...)")
        named = {}
        for path in found:
            relative = path.parent.relative_to(root).as_posix()
            named[root.name if relative == "." else relative.replace("/", "-")] = checkpoint.resolve(path)
    else:
        if not cfg.ckpt:
            raise UserError("ptv2 serve needs prompts: ckpt=RUN_DIR, ckpt=[RUN_A,RUN_B] or runs=DIR")
        named = {}
        for path in checkpoint_paths(cfg.ckpt):
            resolved = checkpoint.resolve(path)
            name = resolved.parent.name if resolved.name == checkpoint.FILENAME else resolved.stem
            named[name if name not in named else f"{name}-{len(named)}"] = resolved
    for name in named:
        check_name("prompt name", name)
    return named


def load_roots(cfg: DictConfig, paths: dict[str, Path]) -> list[Path]:
    """The folders a runtime load (POST /prompts) may read from: runs=DIR, else the folders holding the ckpt runs
    (a run's own folder where that would be the file system's root or the home folder)."""
    if cfg.runs:
        return [Path(cfg.runs).expanduser().resolve()]
    roots = set()
    for path in paths.values():
        run = path.resolve().parent
        roots.add(run if run.parent in (Path(run.anchor), Path.home().resolve()) else run.parent)
    return sorted(roots)


def check_address(host: str, port: int) -> None:
    """The address is free to listen on, checked before the prompts load (uvicorn would fail after)."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise UserError(
            f"cannot listen on {host}:{port} ({error.strerror or error}); pass a free serve.port= (or another "
            "serve.host=)"
        ) from None


def run(cfg: DictConfig, run_dir: Path) -> dict:
    try:
        import uvicorn

        from ptv2.commands import serve_app
    except ImportError as error:
        missing = f"ptv2 serve needs the serve extra ({error.name} is missing)"
        raise UserError(f"{missing}: pip install 'ptv2[serve]'") from None
    from ptv2.commands.serve_pool import PromptPool
    from ptv2.serving import PromptServer

    if cfg.serve.threads:
        torch.set_num_threads(cfg.serve.threads)
    paths = prompt_paths(cfg)
    check_address(cfg.serve.host, cfg.serve.port)

    def config_of(path: str) -> DictConfig:
        return checkpoint_config(OmegaConf.merge(cfg, {"ckpt": path}))

    configs = [config_of(str(path)) for path in paths.values()]
    server = PromptServer.from_checkpoints(paths, configs)
    first = configs[0]
    device = torch.device("cuda" if torch.cuda.is_available() and not first.trainer.cpu else "cpu")
    server.to(device)
    pool = PromptPool(server, paths, config_of, cfg.serve.max_tokens)
    roots = load_roots(cfg, paths)
    app = serve_app.build(pool, cfg.serve, roots)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    summary = {
        "url": url,
        "device": str(device),
        "prompts": [prompt.describe() for prompt in pool.prompts.values()],
        "load_roots": [str(root) for root in roots],
    }
    write_json(run_dir / "serve.json", summary)
    log.info("serving %d prompt(s) on %s (OpenAPI page: %s/docs)", len(pool.prompts), url, url)
    # uvicorn answers SIGTERM / SIGINT by finishing the requests in flight, then raises the signal again for the
    # handler it found: this one notes it, so the command ends as a command does (its run folder unlocked).
    received = []
    previous = {number: signal.signal(number, lambda n, _: received.append(n)) for number in STOP_SIGNALS}
    try:
        uvicorn.run(
            app,
            host=cfg.serve.host,
            port=cfg.serve.port,
            log_level="warning",
            timeout_graceful_shutdown=cfg.serve.shutdown_seconds,
        )
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    log.info("server stopped%s", f" ({signal.Signals(received[0]).name})" if received else "")
    return summary
