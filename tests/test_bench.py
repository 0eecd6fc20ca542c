"""`ptv2 bench` on the tiny backbone, the memory promises of frozen methods, the official-style knobs, and the
multi-process (gloo, CPU) evaluation agreeing with the single-process one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RTE, TINY_BERT, free_port, ptv2
from omegaconf import OmegaConf

from ptv2 import engine
from ptv2.commands import bench
from ptv2.config import BenchRunConfig, over_schema
from ptv2.engine import pad_to_length
from ptv2.modeling import injection
from ptv2.modeling.model import PromptModel

FIXTURES = Path(__file__).parent / "fixtures"
METHODS = ["ptv2", "finetune", "prompt_tuning", "linear_probe"]
TINY_BENCH = [
    "backbone=tiny",
    "bench.batch_size=2",
    "bench.seq_length=12",
    "bench.prompt_length=3",
    "bench.warmup_steps=1",
    "bench.steps=2",
    "bench.eval_batches=1",
    "bench.eval_batch_size=2",
]


def run_ptv2(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="disabled", HYDRA_FULL_ERROR="1")
    command = [*(launcher or [sys.executable]), "-m", "ptv2", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, check=True)


def tiny_cfg(method: str = "ptv2", **bench_keys):
    """A composed-like run config for the tiny backbone (schema defaults + the tiny backbone group)."""
    cfg = over_schema(
        {
            "backbone": {
                "name": "tiny",
                "name_or_path": str(TINY_BERT),
                "random_init": True,
            },
            "task": {"name": "rte", "reader": "superglue"},
            "logger": {"name": "none"},
            "bench": {"batch_size": 2, "seq_length": 12, "steps": 2, "warmup_steps": 1, **bench_keys},
        },
        BenchRunConfig,
    )
    return bench.variant_config(cfg, method)


def test_bench_command_writes_every_method_and_ratios(tmp_path):
    out = tmp_path / "bench"
    result = ptv2("bench", *TINY_BENCH, "bench.isolate=false", f"hydra.run.dir={out}")
    report = json.loads((out / "bench.json").read_text())
    methods = report["methods"]
    assert list(methods) == METHODS
    assert methods["finetune"]["step_ratio"] == 1.0
    for method, figures in methods.items():
        assert figures["step_seconds"]["min"] <= figures["step_seconds"]["median"] <= figures["step_seconds"]["max"]
        assert figures["step_ratio"] > 0 and figures["eval_examples_per_second"] > 0, method
    # Only fine-tuning trains the encoder; prompt methods train far fewer parameters.
    assert methods["ptv2"]["trainable_params"] < methods["finetune"]["trainable_params"]
    assert methods["ptv2"]["prompt_length"] == 3 and methods["linear_probe"]["prompt_length"] == 0
    assert "| ptv2 |" in result.stdout and "step ratio" in result.stdout


@pytest.mark.slow
def test_isolated_bench_measures_memory_per_process(tmp_path):
    out = tmp_path / "bench"
    ptv2("bench", *TINY_BENCH, "bench.methods=[ptv2,finetune]", f"hydra.run.dir={out}")
    methods = json.loads((out / "bench.json").read_text())["methods"]
    assert methods["finetune"]["memory_ratio"] == 1.0
    assert methods["ptv2"]["peak_memory_bytes"] > 0 and methods["ptv2"]["memory_kind"] == "cpu_peak_rss"


def test_variant_config_applies_method_prompt_length_and_frozen_dtype():
    finetune = tiny_cfg("finetune", prompt_length=7, frozen_dtype="bfloat16")
    assert finetune.prompt.method == "finetune" and finetune.optimizer.lr == 2e-5
    assert finetune.backbone.dtype == "float32"  # fine-tuning keeps fp32 master weights
    prompt_tuning = tiny_cfg("prompt_tuning", prompt_length=7, frozen_dtype="bfloat16")
    assert prompt_tuning.prompt.length == 7 and prompt_tuning.backbone.dtype == "bfloat16"


@pytest.mark.parametrize("method", ["ptv2", "prompt_tuning", "linear_probe"])
def test_frozen_weights_get_no_gradient_buffers_or_optimizer_state(method):
    variant = bench.Variant(tiny_cfg(method))
    bench.time_steps([variant], warmup=1, steps=1)
    frozen = [p for p in variant.model.encoder.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    frozen_ids = {id(p) for p in frozen}
    assert variant.optimizer.state and not any(id(p) in frozen_ids for p in variant.optimizer.state)
    trainable = sum(p.numel() for p in variant.model.parameters() if p.requires_grad)
    state = sum(t.numel() for s in variant.optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert state == 2 * trainable  # AdamW: two moments per trainable weight, nothing else


def test_eval_runs_under_inference_mode():
    variant = bench.Variant(tiny_cfg("ptv2"))
    seen = []
    variant.model.register_forward_hook(lambda *_: seen.append(torch.is_inference_mode_enabled()))
    bench.time_eval(variant.model, variant.cfg, variant.batch, variant.device, batches=1)
    assert seen and all(seen)


def test_pad_to_length_pads_token_tensors_only():
    batch = {
        "input_ids": torch.tensor([[5, 6, 0]]),
        "attention_mask": torch.tensor([[1, 1, 0]]),
        "labels": torch.tensor([1]),
    }
    padded = pad_to_length(batch, 6, pad_id=0)
    assert padded["input_ids"].tolist() == [[5, 6, 0, 0, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0]]
    assert padded["labels"].tolist() == [1]


def test_official_style_knobs_train(tmp_path, monkeypatch):
    """trainer.pad_to_max_length, trainer.group_by_length=false and backbone.attention=eager reach the training loop:
    every training batch is task.max_length wide, batches are not grouped by length, attention is written out."""
    seen = {"widths": set(), "attention": set(), "grouped": []}
    forward = PromptModel.forward

    def recording_forward(self, batch, head=None, **options):
        if self.training:
            seen["widths"].add(batch["input_ids"].shape[1])
            seen["attention"].add(self.encoder.config._attn_implementation)
        return forward(self, batch, head, **options)

    batches = engine.LengthGroupedBatches
    monkeypatch.setattr(PromptModel, "forward", recording_forward)
    monkeypatch.setattr(engine, "LengthGroupedBatches", lambda *args: seen["grouped"].append(args[3]) or batches(*args))
    out = tmp_path / "run"
    ptv2(
        "train", "backbone=tiny", "trainer=smoke", f"task.data_dir={RTE}", "logger=none",
        "trainer.pad_to_max_length=true", "trainer.group_by_length=false", "backbone.attention=eager",
        f"hydra.run.dir={out}",
    )  # fmt: skip
    max_length = OmegaConf.load(out / "config.yaml").task.max_length
    assert seen["widths"] == {max_length}  # the fixture's sentences are far shorter: padding did this
    assert seen["grouped"] == [False]
    assert seen["attention"] == {injection.EAGER_ATTENTION_KEY}
    assert json.loads((out / "results.json").read_text())["history"][0]["train_seconds"] > 0


@pytest.mark.slow
def test_two_process_cpu_training_and_eval_match_one_process(tmp_path):
    """accelerate launch (gloo, 2 CPU processes) trains through the same entrypoint, and evaluating its checkpoint
    on 2 processes gives the 1-process metric: every dev example counted once (6 examples in uneven batches)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    data = [f"task.data_dir={RTE}", "trainer.eval_batch_size=4", "trainer.limit_eval=null"]
    train_dir = tmp_path / "train"
    run_ptv2(
        "train", "backbone=tiny", "trainer=smoke", *data, "logger=none", f"hydra.run.dir={train_dir}",
        launcher=[*launch, "--main_process_port", str(free_port())],
    )  # fmt: skip
    assert (train_dir / "prompt.safetensors").exists()
    single, double = tmp_path / "eval1", tmp_path / "eval2"
    run_ptv2("eval", f"ckpt={train_dir}", *data, f"hydra.run.dir={single}")
    run_ptv2(
        "eval", f"ckpt={train_dir}", *data, f"hydra.run.dir={double}",
        launcher=[*launch, "--main_process_port", str(free_port())],
    )  # fmt: skip
    one, two = (json.loads((d / "eval.json").read_text()) for d in (single, double))
    assert one["examples"] == two["examples"] == {"rte": 6}
    assert one["metrics"] == two["metrics"]


def test_written_out_attention_matches_sdpa():
    """The CPU training path (and backbone.attention=eager) computes what SDPA computes, padding included."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 5, 8, generator=generator) for _ in range(3))
    key, value = torch.cat([key, key[:, :, :4]], 2), torch.cat([value, value[:, :, :4]], 2)  # 9 key columns
    mask = torch.ones(2, 1, 5, 9, dtype=torch.bool)
    mask[1, ..., 7:] = False  # padded keys of the second example
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2)
    output, _ = injection._written_out_attention(query, key, value, mask, 0.0, None)
    assert torch.allclose(output, expected, atol=1e-6)


def test_eager_backbone_attention_equals_sdpa_with_prefix():
    from conftest import padded_batch, tiny_encoder

    _, encoder = tiny_encoder("bert")
    input_ids, mask = padded_batch()
    _, heads, head_dim = injection.encoder_shape(encoder.config)
    generator = torch.Generator().manual_seed(3)
    prefix = {i: tuple(torch.randn(1, heads, 4, head_dim, generator=generator) for _ in "kv") for i in range(3)}
    sdpa = injection.run_encoder(encoder, prefix, input_ids=input_ids, attention_mask=mask)
    encoder.set_attn_implementation(injection.EAGER_ATTENTION_KEY)
    eager = injection.run_encoder(encoder, prefix, input_ids=input_ids, attention_mask=mask)
    assert torch.allclose(eager, sdpa, atol=1e-5)


def test_bench_fails_with_one_line_per_method_and_exits_non_zero_when_every_method_failed(tmp_path, monkeypatch):
    """Issue 22: a bench whose every method failed exits non-zero; each failure is one line, not a stack."""

    def failing(variant, work_dir, profile):
        return {"method": variant.prompt.method, "error": "out of memory"}

    monkeypatch.setattr(bench, "measure_isolated", failing)
    out = tmp_path / "bench"
    result = ptv2("bench", *TINY_BENCH, "bench.methods=[ptv2,prompt_tuning]", f"hydra.run.dir={out}", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "ptv2: error: every method failed (ptv2: out of memory; prompt_tuning: out of memory); the details are in "
        f"{out}/bench_<method>.err"
    )
    assert "| ptv2 | failed: out of memory |" in result.stdout


def test_bench_on_a_missing_gpu_is_refused_before_any_worker_starts(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    result = ptv2("bench", *TINY_BENCH, "bench.device=cuda", f"hydra.run.dir={tmp_path / 'b'}", check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "ptv2: error: bench.device=cuda but no CUDA device is visible; use bench.device=auto or cpu"
    ]
    assert not (tmp_path / "b").exists()  # a refused start leaves nothing


@pytest.mark.slow
def test_a_failed_worker_is_one_log_line_with_its_details_in_a_file(tmp_path):
    variant = tiny_cfg("ptv2")
    variant.bench.device = "cuda" if not torch.cuda.is_available() else "nope"
    figures = bench.measure_isolated(variant, tmp_path, profile=False)
    assert figures["method"] == "ptv2" and "\n" not in figures["error"]
    assert (tmp_path / "bench_ptv2.err").read_text().strip()
