"""The method packages: each run carries only its method's settings, a key of another method is refused in one line
before torch loads, every entry's defaults pass its own checks, and old checkpoints keep loading."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest
from conftest import RTE, compose_config, ptv2
from omegaconf import OmegaConf

from ptv2.checks import check_values
from ptv2.errors import UserError
from ptv2.modeling.methods import METHODS, with_setting

# Settings one method has and a ptv2 run must never carry
FOREIGN = ("r", "alpha", "target_modules", "encoder")


@pytest.mark.parametrize("name", METHODS)
def test_a_composed_run_holds_exactly_its_methods_settings(name):
    cfg = compose_config(f"prompt={name}")
    assert set(cfg.prompt) == {item.name for item in fields(METHODS[name].settings)}
    check_values(cfg)  # the defaults pass the method's own ranges


def test_a_key_of_another_method_is_refused_in_one_line_before_torch_loads():
    code = (
        "import sys; from ptv2 import cli; code = cli.main(['train', 'prompt=lora', 'prompt.length=8']); "
        "print('torch' in sys.modules, code)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "2"]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("ptv2: error: prompt.length is not a setting of prompt=lora; it is one of ptv2, ")
    assert "prompt=lora has method, init_from, r, alpha, dropout, target_modules" in line


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prompt=finetune", "+prompt.length=8"], "prompt.length is not a setting of prompt=finetune"),
        (["prompt.r=4"], "prompt.r is not a setting of prompt=ptv2; it is one of lora"),
        (["prompt.lenght=4"], "prompt.lenght is not a setting of any prompt method; did you mean prompt.length?"),
        (["prompt=lora", "prompt.r=0"], "prompt.r=0 is out of range; use an integer >= 1"),
        (["prompt=ptuning_v1", "prompt.encoder=gru"], "prompt.encoder=gru is unknown; choose one of lstm, mlp"),
    ],
)
def test_prompt_settings_are_refused_by_the_chosen_methods_schema(overrides, message, tmp_path):
    result = ptv2("train", "backbone=tiny", *overrides, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"ptv2: error: {message}")
    assert not (tmp_path / "run").exists()


def test_renaming_the_method_instead_of_choosing_it_is_refused():
    with pytest.raises(UserError, match=r"prompt.method=lora renames prompt=ptv2's settings; choose the method with "):
        check_values(compose_config("prompt.method=lora"))


def test_a_ptv2_run_records_no_other_methods_keys(tmp_path):
    out = tmp_path / "run"
    ptv2("train", "backbone=tiny", "trainer=smoke", f"task.data_dir={RTE}", "logger=none", f"hydra.run.dir={out}")
    saved = OmegaConf.load(out / "config.yaml")
    assert not set(FOREIGN) & set(saved.prompt)
    assert set(saved.prompt) == {item.name for item in fields(METHODS["ptv2"].settings)}
    assert not {"bench", "serve", "ckpt", "split", "runs"} & set(saved)  # other commands' keys


def test_a_checkpoint_written_with_every_methods_keys_loads_with_its_own():
    """Runs saved while one prompt schema held every method's keys: the keys their method never read are dropped."""
    from ptv2.runs.checkpoint import _own_prompt_settings

    old = OmegaConf.create({"prompt": {"method": "ptv2", "length": 8, "r": 8, "alpha": 16.0, "encoder": "lstm"}})
    _own_prompt_settings(old)
    assert dict(old.prompt) == {"method": "ptv2", "length": 8}


def test_with_setting_names_the_methods_that_read_a_key():
    assert with_setting("r") == ["lora"]
    assert "ptv2" in with_setting("length") and "lora" not in with_setting("length")
    assert set(with_setting("method")) == set(METHODS)
