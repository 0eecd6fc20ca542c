"""The frozen cache (trainer.cache_frozen, ptv2/frozen.py): a run that reads the hidden states entering its lowest
prompted layer from the cache computes what the uncached run computes with dropout off in the layers below it.

The model-level checks run a training-mode forward and backward with dropout on (prompt, head and the backbone's
layers above the cache) on tiny BERT, RoBERTa and two decoders, for top:K, a layer list and the linear probe; the
run-level checks compare `ptv2 train` with and without the cache (single runs, a packed group of two depths, a
resumed run), the cache's reuse and memory-mapped reads, the refusals and the packed launcher's grouping.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_CONFIGS, RTE, TINY_BERT, compose_config, ptv2, ptv2_subprocess
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModel

from ptv2 import frozen
from ptv2.checks import frozen_cache_refusal, lowest_prompted_layer, validate
from ptv2.commands import packed
from ptv2.errors import UserError
from ptv2.modeling import injection
from ptv2.modeling.heads import ClassificationHead
from ptv2.modeling.model import PromptModel, cached_start
from ptv2.runs import resume as state

FIXTURES = Path(__file__).parent / "fixtures"
DECODERS = FIXTURES / "decoders"
DROPOUT = 0.1


def encoder_with_dropout(family: str) -> torch.nn.Module:
    """A tiny 3-layer prompt-ready encoder whose every dropout rate is DROPOUT."""
    if family in FAMILY_CONFIGS:
        config = FAMILY_CONFIGS[family]()
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = DROPOUT
    else:
        config = copy.deepcopy(AutoConfig.from_pretrained(DECODERS / family))
        for name in ("attention_dropout", "embd_pdrop", "resid_pdrop", "attn_pdrop"):
            if hasattr(config, name):
                setattr(config, name, DROPOUT)
    torch.manual_seed(0)
    no_pooler = {"add_pooling_layer": False} if family in ("bert", "roberta") else {}
    encoder = AutoModel.from_config(config, attn_implementation=injection.ATTENTION_KEY, **no_pooler)
    injection.prepare_encoder(encoder)
    return encoder


def prompt_cfg(method: str = "ptv2", layers="all"):
    return OmegaConf.create(
        dict(
            method=method,
            length=3,
            projection="none",
            projection_dim=16,
            dropout=DROPOUT,
            layers=layers,
            shift_positions=False,
            encoder="lstm",
        )
    )


def right_padded(vocab_size: int, lengths=(9, 6, 4)) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab_size, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor([0, 1, 2])}


def switch_off_dropout_below(encoder: torch.nn.Module, layer: int) -> None:
    """Dropout rate 0 in the embeddings and the layers below `layer` (the uncached run the cached one equals)."""
    holder, name = injection.layer_stack(encoder)
    above = {id(m) for block in list(getattr(holder, name))[layer:] for m in block.modules()}
    for module in encoder.modules():
        if id(module) in above:
            continue
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def loss_and_gradients(model: PromptModel, batch: dict) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(7)  # the same dropout draws (prompt, layers above the cache, head) in both runs
    model.zero_grad(set_to_none=True)
    logits = model(batch)
    model.head_for(None).loss(logits, batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


CASES = [("ptv2", "top:2"), ("ptv2", [1, 2]), ("ptv2", [2]), ("linear_probe", "all")]
FAMILIES = [("bert", False), ("roberta", False), ("roberta", True), ("llama", False), ("gpt2", False), ("qwen2", False)]


@pytest.mark.parametrize(("family", "shifted"), FAMILIES)
@pytest.mark.parametrize(("method", "layers"), CASES)
def test_cached_forward_and_backward_equal_the_uncached_ones_without_dropout_below(family, shifted, method, layers):
    encoder = encoder_with_dropout(family)
    cfg = prompt_cfg(method, layers)
    cfg.shift_positions = shifted  # tokens numbered from P on (encoders; the official numbering)
    model = PromptModel(encoder, cfg, {"t": (ClassificationHead, 3)}, head_dropout=DROPOUT)
    num_layers = injection.encoder_shape(encoder.config)[0]
    layer = lowest_prompted_layer(cfg, num_layers)
    assert layer == {"top:2": 1, "[1, 2]": 1, "[2]": 2, "all": num_layers}[str(layers)]
    batch = right_padded(encoder.config.vocab_size)
    mask = batch["attention_mask"]

    positions = injection.shifted_position_ids(encoder.config, mask, cfg.length) if model.shift_positions else None
    model.eval()
    with torch.inference_mode():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": mask}
        if positions is not None:
            inputs["position_ids"] = positions
        entering = injection.hidden_entering(encoder, [layer], **inputs)[layer]
    # the cache keeps real tokens only; padded positions come back as zeros
    cached = {**batch, "frozen_hidden": {layer: entering.clone() * mask[..., None]}}
    model.train()
    with_dropout, _ = loss_and_gradients(model, batch)
    cached_logits, cached_grads = loss_and_gradients(model, cached)
    switch_off_dropout_below(encoder, layer)
    logits, grads = loss_and_gradients(model, batch)

    torch.testing.assert_close(cached_logits, logits, rtol=1e-5, atol=1e-6)
    assert cached_grads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(cached_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # dropout was on below the cache: the paper setting differs from both
    assert not torch.allclose(with_dropout, logits, atol=1e-6)
    # the layers below the cache were cut for the forward only
    holder, name = injection.layer_stack(encoder)
    assert len(getattr(holder, name)) == num_layers
    assert all(m.training for m in encoder.modules() if isinstance(m, torch.nn.Dropout))


def test_each_model_runs_from_the_highest_cached_layer_it_may_use():
    encoder = encoder_with_dropout("bert")
    model = PromptModel(encoder, prompt_cfg(layers="top:1"), {"t": (ClassificationHead, 3)}, head_dropout=0.0).eval()
    assert model.lowest_layer == 2 and cached_start({1: None, 2: None}, 2) == 2 and cached_start({3: None}, 2) is None
    batch = right_padded(encoder.config.vocab_size)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.inference_mode():
        entering = injection.hidden_entering(encoder, [1, 2], **inputs)
        whole = model(batch)
        from_two = model({**batch, "frozen_hidden": {1: torch.zeros_like(entering[1]), 2: entering[2]}})
        from_one = model({**batch, "frozen_hidden": {1: entering[1]}})
    torch.testing.assert_close(from_two, whole)  # layer 1's (wrong) states unused: the model starts at 2
    torch.testing.assert_close(from_one, whole)  # only layer 1 cached: layer 1 runs again
    assert injection.hidden_entering(encoder, [3], **inputs)[3].shape == entering[1].shape  # the encoder's output


def test_backbones_whose_layers_differ_in_attention_type_are_refused():
    config = copy.deepcopy(AutoConfig.from_pretrained(DECODERS / "qwen2"))
    cfg = run_cfg("prompt.layers=top:1")
    assert frozen_cache_refusal(cfg, config) is None
    config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    assert "layer_types" in frozen_cache_refusal(cfg, config)


def test_dropout_below_reads_modules_and_decoder_rates():
    encoder = encoder_with_dropout("bert")
    assert frozen.dropout_below(encoder, 1) == DROPOUT
    switch_off_dropout_below(encoder, 2)
    assert frozen.dropout_below(encoder, 2) == 0.0
    assert frozen.dropout_below(encoder, 3) == DROPOUT  # layer 2 keeps its dropout
    assert frozen.dropout_below(encoder_with_dropout("llama"), 1) == DROPOUT


# ----------------------------------------------------------------------------------------------- refusals


def run_cfg(*overrides: str):
    return compose_config("backbone=tiny", "task=rte", f"task.data_dir={RTE}", *overrides)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["prompt.layers=all"], "prompts layer 0"),
        (["prompt.layers=bottom:1"], "prompts layer 0"),
        (["prompt=finetune"], "trains the backbone"),
        (["prompt=prompt_tuning"], "puts its prompt into the input"),
        (["prompt=lora"], "the lowest ones included"),
    ],
)
def test_cache_frozen_true_is_refused_with_the_reason(overrides, reason):
    cfg = run_cfg("trainer.cache_frozen=true", *overrides)
    config = AutoConfig.from_pretrained(cfg.backbone.name_or_path)
    with pytest.raises(UserError, match=f"trainer.cache_frozen=true cannot hold: .*{reason}"):
        validate(cfg, config)
    assert frozen_cache_refusal(run_cfg(*overrides), config) is not None
    assert frozen_cache_refusal(run_cfg("prompt.layers=top:1"), config) is None


def test_a_refused_cache_is_one_line_and_writes_no_run(tmp_path):
    result = ptv2(
        "train", "backbone=tiny", f"task.data_dir={RTE}", "logger=none", "trainer.cache_frozen=true",
        f"hydra.run.dir={tmp_path / 'run'}", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "ptv2: error: trainer.cache_frozen=true cannot hold: prompt.layers=all prompts layer 0, so no layer lies below "
        "the prompt; use trainer.cache_frozen=auto or false"
    ]
    assert not (tmp_path / "run" / "results.json").exists()


def test_auto_caches_only_without_dropout_below():
    config = AutoConfig.from_pretrained(run_cfg().backbone.name_or_path)
    encoder = AutoModel.from_config(config)
    on = frozen.plan([run_cfg("prompt.layers=top:1")], config, encoder)
    assert on.layers == () and "apply dropout 0.1" in on.reason and on.dropout == 0.1
    forced = frozen.plan([run_cfg("prompt.layers=top:1", "trainer.cache_frozen=true")], config, encoder)
    assert forced.layers == (1,) and "without their dropout 0.1" in forced.reason
    switch_off_dropout_below(encoder, 2)
    exact = frozen.plan([run_cfg("prompt.layers=top:1"), run_cfg("prompt=linear_probe")], config, encoder)
    assert exact.layers == (1, 2) and "exact" in exact.reason  # each job's own k
    assert frozen.plan([run_cfg("prompt=linear_probe")], config, encoder).layers == (2,)
    assert frozen.plan([run_cfg("prompt.layers=top:1", "trainer.cache_frozen=false")], config, encoder).layers == ()
    # worth it: not for a run that ends before one pass over its training data (unless asked for)
    short = [run_cfg("prompt.layers=top:1", "trainer.max_steps=2", "trainer.batch_size=4")]
    assert "trainer.max_steps=2" in frozen.plan(short, config, encoder, train_features=9).reason
    assert frozen.plan(short, config, encoder, train_features=8).layers == (1,)
    short[0].trainer.cache_frozen = True
    assert frozen.plan(short, config, encoder, train_features=9).layers == (1,)


def test_packed_groups_split_jobs_that_cannot_use_the_cache():
    exact = ["backbone.dropout=0", "backbone.attention_dropout=0"]
    keys = {
        layers: packed.group_key(run_cfg(f"prompt.layers={layers}", *exact))
        for layers in ("top:1", "[1]", "all", "bottom:1")
    }
    assert keys["top:1"] == keys["[1]"] and keys["all"] == keys["bottom:1"] and keys["top:1"] != keys["all"]
    # with dropout on, auto caches nothing: the depths stay in one group as before
    assert packed.group_key(run_cfg("prompt.layers=top:1")) == packed.group_key(run_cfg("prompt.layers=all"))
    off = [*exact, "trainer.cache_frozen=false"]
    top, every = (packed.group_key(run_cfg(f"prompt.layers={layers}", *off)) for layers in ("top:1", "all"))
    assert top == every


# ----------------------------------------------------------------------------------------------- runs

NO_DROPOUT = ["backbone.dropout=0", "backbone.attention_dropout=0"]
RUN = [
    "backbone=tiny",
    f"task.data_dir={RTE}",
    "logger=none",
    "trainer.epochs=2",
    "trainer.batch_size=4",
    "trainer.eval_batch_size=4",
    "trainer.progress=false",
    "prompt.length=3",
]


def figures(run_dir: Path) -> tuple[list, dict, dict]:
    results = json.loads((run_dir / "results.json").read_text())
    history = [{k: v for k, v in record.items() if not k.endswith("_seconds")} for record in results["history"]]
    trained = state.read(run_dir / state.STATE_DIR / state.STATE_FILE)["trainable"]
    return history, trained, results["frozen_cache"]


def assert_same_run(ours: Path, theirs: Path) -> None:
    history, trained, _ = figures(ours)
    other_history, other_trained, _ = figures(theirs)
    assert [r["step"] for r in history] == [r["step"] for r in other_history]
    for record, other in zip(history, other_history, strict=True):
        for key, value in record.items():
            assert value == pytest.approx(other[key], rel=1e-5, abs=1e-7), key
    assert trained.keys() == other_trained.keys()
    for name, tensor in trained.items():
        torch.testing.assert_close(tensor, other_trained[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "overrides",
    [
        ["prompt.layers=top:1"],
        ["prompt.layers=[1]"],
        ["prompt=linear_probe"],
        ["prompt.layers=top:1", "prompt.shift_positions=true"],  # the official numbering: tokens from P on
        # spans: the loss's softmax reads padded positions too, which are then cached up to task.max_length
        ["prompt.layers=top:1", "task=squad", f"task.data_dir={FIXTURES / 'squad'}"],
    ],
)
def test_a_cached_run_equals_the_uncached_run(overrides, tmp_path):
    cached, uncached = tmp_path / "cached", tmp_path / "uncached"
    cache = f"trainer.cache_dir={tmp_path / 'cache'}"  # a cache of this test's own: the first run builds it
    run = [arg for arg in RUN if arg != "prompt.length=3"] if "prompt=linear_probe" in overrides else RUN  # no prompt
    ptv2("train", *run, *NO_DROPOUT, *overrides, cache, f"hydra.run.dir={cached}")
    ptv2("train", *run, *NO_DROPOUT, *overrides, "trainer.cache_frozen=false", f"hydra.run.dir={uncached}")
    assert_same_run(cached, uncached)
    record = figures(cached)[2]
    assert record["layers"] == ([2] if "prompt=linear_probe" in overrides else [1])
    assert record["dropout_in_cached_layers"] == 0.0 and "exact" in record["reason"]
    off = {"layers": [], "reason": "trainer.cache_frozen=false", "dropout_in_cached_layers": 0}
    assert figures(uncached)[2] == off
    built = [line for line in (cached / "train.log").read_text().splitlines() if "frozen cache " in line]
    assert len(built) == 2 and all(" built in " in line for line in built)
    # a second run reads the cache entries the first built
    ptv2("train", *run, *NO_DROPOUT, *overrides, cache, f"hydra.run.dir={tmp_path / 'again'}")
    assert_same_run(tmp_path / "again", cached)
    read = [line for line in (tmp_path / "again" / "train.log").read_text().splitlines() if "frozen cache " in line]
    assert len(read) == 2 and all(" read in " in line for line in read)


def four_layer_bert(folder: Path) -> list[str]:
    """Backbone overrides for a tiny 4-layer BERT on the packaged tiny tokenizer."""
    folder.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(TINY_BERT / name, folder / name)
    config = {**json.loads((TINY_BERT / "config.json").read_text()), "num_hidden_layers": 4}
    (folder / "config.json").write_text(json.dumps(config))
    return ["backbone.name=tiny4", f"backbone.name_or_path={folder}"]


def test_a_packed_group_of_two_depths_shares_one_cache_and_equals_separate_runs(tmp_path):
    # no dropout anywhere: a packed group's jobs draw their dropout from one generator, separate runs each from its own
    exact = [*NO_DROPOUT, "prompt.dropout=0", "task.head_dropout=0", *four_layer_bert(tmp_path / "tiny4")]
    sweep = tmp_path / "sweep"
    ptv2("train", "-m", *RUN, *exact, "hydra/launcher=packed", "prompt.layers=top:1,top:2,[0,3]",
         f"hydra.sweep.dir={sweep}")  # fmt: skip
    log = (sweep / "multirun.log").read_text() if (sweep / "multirun.log").exists() else ""
    expected = {"top:1": [2, 3], "top:2": [2, 3], "[0, 3]": []}  # one cache of both depths; [0, 3] prompts layer 0
    seen = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        cfg = OmegaConf.load(job / "config.yaml")
        layers = str(cfg.prompt.layers if isinstance(cfg.prompt.layers, str) else list(cfg.prompt.layers))
        seen[layers] = figures(job)[2]["layers"]
        alone = tmp_path / f"alone-{job.name}"
        override = f"prompt.layers={layers}".replace(" ", "")
        ptv2("train", *RUN, *exact, override, "trainer.cache_frozen=false", f"hydra.run.dir={alone}")
        assert_same_run(job, alone)
    assert seen == expected, log


def test_a_resumed_cached_run_equals_the_uninterrupted_one(tmp_path):
    args = [*RUN, *NO_DROPOUT, "prompt.layers=top:1", "trainer.epochs=3", "trainer.save_every_steps=1"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    ptv2("train", *args, f"hydra.run.dir={whole}")
    died = ptv2_subprocess("train", *args, f"hydra.run.dir={stopped}", env={"PTV2_DIE_AT_STEP": "4"}, check=False)
    assert died.returncode != 0 and not (stopped / "results.json").exists()
    ptv2("train", *args, f"hydra.run.dir={stopped}", "trainer.resume=true")
    assert_same_run(stopped, whole)


def test_dropout_forced_off_is_recorded(tmp_path):
    ptv2("train", *RUN, "prompt.layers=top:1", "trainer.cache_frozen=true", f"hydra.run.dir={tmp_path}")
    record = figures(tmp_path)[2]
    assert record["layers"] == [1] and record["dropout_in_cached_layers"] == 0.1
    assert "without their dropout 0.1" in record["reason"]


def test_memory_mapped_entries_give_the_same_rows(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    hidden = torch.randn(10, 4)
    offsets = torch.tensor([0, 3, 3 + 5, 10])
    path = tmp_path / "entry.safetensors"
    save_file({"hidden": hidden, "offsets": offsets}, str(path))
    in_memory, mapped = frozen.FrozenStates(1, path, True), frozen.FrozenStates(1, path, False)
    rows = in_memory.rows([2, 0], 6)
    assert torch.equal(rows, mapped.rows([2, 0], 6))
    assert torch.equal(rows[0, :2], hidden[8:10]) and torch.equal(rows[1, :3], hidden[0:3])
    assert not rows[0, 2:].any() and not rows[1, 3:].any()


def test_a_damaged_entry_is_built_again(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "entry.safetensors"
    save_file({"hidden": torch.randn(10, 4), "offsets": torch.tensor([0, 3, 8, 10])}, str(path))
    assert frozen.readable(path, 3)
    assert not frozen.readable(path, 4) and not path.exists()  # offsets of another split
    path.write_bytes(b"not safetensors")
    assert not frozen.readable(path, 3) and not path.exists()


def test_bench_times_top_k_cached_against_uncached_on_two_depths(tmp_path):
    result = ptv2(
        "bench", "backbone=tiny", "bench.cache=[1,3]", "bench.cache_layers=3", "bench.steps=2",
        "bench.warmup_steps=0", "bench.batch_size=2", "bench.seq_length=8", "bench.cache_examples=4",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = [(row["backbone"], row["layers"], row["top"]) for row in report["rows"]]
    assert rows == [("tiny", 2, 1), ("tiny-3L", 3, 1)]  # top:3 prompts layer 0 of both: nothing to cache
    for row in report["rows"]:
        assert row["cached_from_layer"] == row["layers"] - 1
        assert row["predicted_ratio"] == pytest.approx(3 / (row["layers"] + 2))
        assert row["cache_bytes"] == 4 * 8 * 32 * 4  # examples x tokens x hidden x float32
        assert row["uncached_step_seconds"] > 0 and row["cached_step_seconds"] > 0 and row["epoch_examples"] == 4
    assert "| tiny-3L | 3 | 1 |" in result.stdout
