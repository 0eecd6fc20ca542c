"""`ptv2 export --to peft` and `ptv2 import --from peft`: stock PEFT loads what export writes and computes what
`ptv2 predict` computes (the tagging task under PeftModel's own forward; the pair task through the exact call that
docs/lora.md gives, as export says); LoRA both ways; every odd input refused in one line with nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_BERT, ptv2
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer

from ptv2.commands.export import portable_base
from ptv2.modeling import backbone
from ptv2.modeling.heads import TokenClassificationHead
from ptv2.modeling.model import PromptModel
from ptv2.runs import checkpoint

peft = pytest.importorskip("peft")

CONLL03 = [
    "task=conll03",
    f"task.data_dir={FIXTURES / 'tagging'}",
    *(f"task.files.{split}=conll03_iob1.txt" for split in ("train", "dev", "test")),
]
RTE_DIR = FIXTURES / "rte_small"
RTE = ["task=rte", f"task.data_dir={RTE_DIR}"]


@pytest.fixture(scope="module")
def saved_tiny_bert(tmp_path_factory) -> Path:
    """The packaged tiny BERT with saved random weights: a backbone folder both ptv2 and PEFT load identically."""
    folder = tmp_path_factory.mktemp("tiny-bert-weights")
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(TINY_BERT)).save_pretrained(folder)
    for file in TINY_BERT.iterdir():
        if file.name != "config.json":
            shutil.copy(file, folder / file.name)
    return folder


def train_tiny(folder: Path, run_dir: Path, task: list[str], *overrides: str) -> Path:
    ptv2(
        "train",
        "backbone=tiny",
        "backbone.random_init=false",
        "backbone.name=tinyw",
        f"backbone.name_or_path={folder}",
        "trainer=smoke",
        "logger=none",
        *task,
        *([] if "prompt=lora" in overrides else ["prompt.length=4"]),  # LoRA has no prompt length
        "optimizer.lr=0.5",
        *overrides,
        f"hydra.run.dir={run_dir}",
    )
    return run_dir


@pytest.fixture(scope="module")
def runs(saved_tiny_bert, tmp_path_factory) -> dict[str, Path]:
    """Trained runs: the README's main job's shape (RTE pairs, tokens numbered from 0), a shifted tagging prompt,
    and LoRA on the pair task."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "pair": train_tiny(saved_tiny_bert, root / "pair", RTE),
        "tagging": train_tiny(saved_tiny_bert, root / "tagging", CONLL03, "prompt.shift_positions=true"),
        "lora": train_tiny(saved_tiny_bert, root / "lora", RTE, "prompt=lora", "optimizer.lr=0.05"),
    }


def export(run: Path, out: Path, folder: Path, *flags: str, check: bool = True):
    return ptv2("export", f"ckpt={run}", "--to", "peft", str(out), "--backbone", str(folder), *flags, check=check)


def predicted_scores(run: Path, folder: Path, where: Path) -> torch.Tensor:
    """`ptv2 predict` on the RTE fixture's dev file: each record's label probabilities, in label order."""
    ptv2("predict", f"ckpt={run}", f"input={RTE_DIR / 'val.jsonl'}", f"backbone.name_or_path={folder}",
         f"output_dir={where}", f"hydra.run.dir={where / 'run'}")  # fmt: skip
    lines = [json.loads(line) for line in (where / "rte-scores.jsonl").read_text().splitlines()]
    return torch.tensor([list(line["scores"].values()) for line in lines], dtype=torch.float64)


def rte_batch(folder: Path) -> dict:
    """The RTE fixture's dev pairs encoded as ptv2 encodes them (premise, hypothesis; with segment ids)."""
    records = [json.loads(line) for line in (RTE_DIR / "val.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ([r["premise"] for r in records], [r["hypothesis"] for r in records])
    return dict(tokenizer(*texts, truncation=True, max_length=128, padding=True, return_tensors="pt"))


def classify(hidden: torch.Tensor, heads: dict) -> torch.Tensor:
    logits = hidden[:, 0] @ heads["heads.rte.linear.weight"].T + heads["heads.rte.linear.bias"]
    return logits.double().softmax(-1)


def test_pair_task_prefix_exported_with_the_exact_call_gives_ptv2_predicts_probabilities(
    runs, saved_tiny_bert, tmp_path
):
    """The README's main job (RTE: sentence pairs, tokens numbered from 0) exports; export says that PeftModel's
    own forward is not ptv2's function and why; the exact call docs/lora.md gives is, to 1e-5 of `ptv2 predict`."""
    out = tmp_path / "adapter"
    result = export(runs["pair"], out, saved_tiny_bert)
    assert "is NOT ptv2's function here" in result.stdout
    assert "token_type_ids" in result.stdout and "position ids from 0" in result.stdout
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["peft_type"] == "PREFIX_TUNING" and settings["base_model_name_or_path"] is None  # no local path
    expected = predicted_scores(runs["pair"], saved_tiny_bert, tmp_path / "predict")

    model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(saved_tiny_bert), str(out)).eval()
    heads = load_file(str(out / "ptv2_heads.safetensors"))
    batch = rte_batch(saved_tiny_bert)
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    rows, length, prefix = ids.shape[0], ids.shape[1], settings["num_virtual_tokens"]
    with torch.no_grad():
        # The exact call (docs/lora.md): the base model, PEFT's prefix as its cache, segment and position ids kept.
        hidden = model.get_base_model()(
            input_ids=ids,
            attention_mask=torch.cat([mask.new_ones(rows, prefix), mask], 1),
            token_type_ids=types,
            position_ids=torch.arange(length).expand(rows, length),
            cache=model.get_prompt(batch_size=rows),
        ).last_hidden_state
        exact = classify(hidden, heads)
        stock = classify(model(input_ids=ids, attention_mask=mask).last_hidden_state, heads)
    assert (exact - expected).abs().max().item() <= 1e-5
    assert (stock - expected).abs().max().item() > 1e-3  # what export warns about is real


def test_tagging_prefix_under_peft_s_own_forward_gives_ptv2_s_logits_and_predictions(runs, saved_tiny_bert, tmp_path):
    out = tmp_path / "adapter"
    result = export(runs["tagging"], out, saved_tiny_bert)
    assert "computes ptv2's function" in result.stdout and "NOT" not in result.stdout
    run_dir = runs["tagging"]
    saved = checkpoint.stored_config(run_dir)
    saved.backbone.name_or_path = str(saved_tiny_bert)
    encoder, _ = backbone.load_encoder(saved.backbone)
    labels = json.loads(checkpoint.read_metadata(run_dir)["labels"])["conll03"]
    ours = PromptModel(encoder, saved.prompt, {"conll03": (TokenClassificationHead, len(labels))}, 0.0).eval()
    checkpoint.load(run_dir, ours, use_folded=True)
    theirs = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(saved_tiny_bert), str(out)).eval()
    heads = load_file(str(out / "ptv2_heads.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(saved_tiny_bert)
    sentences = [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"], ["BRUSSELS", "1996-08-22", "a", "b", "c"]]
    batch = dict(tokenizer(sentences, is_split_into_words=True, padding=True, return_tensors="pt"))
    with torch.no_grad():
        hidden = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = hidden @ heads["heads.conll03.linear.weight"].T + heads["heads.conll03.linear.bias"]
        expected = ours(batch)
    real = batch["attention_mask"].bool()
    assert (logits[real] - expected[real]).abs().max().item() <= 1e-5

    # ptv2 predict's word tags of the fixture's sentences against the tags of PEFT's logits at each word's first piece.
    ptv2("predict", f"ckpt={run_dir}", f"backbone.name_or_path={saved_tiny_bert}", *CONLL03[1:],
         f"output_dir={tmp_path / 'predict'}", f"hydra.run.dir={tmp_path / 'predict' / 'run'}")  # fmt: skip
    predicted = [json.loads(line) for line in (tmp_path / "predict" / "conll03-test-predictions.jsonl").open()]
    assert len(predicted) > 1
    for line in predicted:
        encoded = tokenizer(line["tokens"], is_split_into_words=True, truncation=True, max_length=256)
        with torch.no_grad():
            hidden = theirs(input_ids=torch.tensor([encoded["input_ids"]])).last_hidden_state[0]
        tags = (hidden @ heads["heads.conll03.linear.weight"].T + heads["heads.conll03.linear.bias"]).argmax(-1)
        words = encoded.word_ids()
        first = [words.index(word) for word in range(len(line["tokens"]))]
        assert [labels[tags[at]] for at in first] == line["tags"]


def test_prefix_round_trip_is_bit_for_bit_and_scores_the_same(runs, saved_tiny_bert, tmp_path):
    out, back = tmp_path / "adapter", tmp_path / "back"
    export(runs["tagging"], out, saved_tiny_bert)
    ptv2("import", str(out), "--from", "peft", str(back), "--like", str(runs["tagging"]),
         "--backbone", str(saved_tiny_bert))  # fmt: skip
    original, imported = (
        load_file(str(runs["tagging"] / "prompt.safetensors")),
        load_file(str(back / "prompt.safetensors")),
    )
    assert torch.equal(imported.pop("prompt.embedding.weight"), original["prompt.embedding.weight"])
    assert imported.keys() == {k for k in original if k.startswith("heads.")}
    assert all(torch.equal(imported[k], original[k]) for k in imported)
    scores = []
    for name, ckpt in (("a", runs["tagging"]), ("b", back)):
        ptv2("eval", f"ckpt={ckpt}", f"backbone.name_or_path={saved_tiny_bert}", *CONLL03[1:],
             f"hydra.run.dir={tmp_path / name}")  # fmt: skip
        scores.append(json.loads((tmp_path / name / "eval.json").read_text())["metrics"]["f1"])
    assert scores[0] == scores[1]


def test_pair_prefix_imported_back_keeps_numbering_from_zero(runs, saved_tiny_bert, tmp_path):
    out, back = tmp_path / "adapter", tmp_path / "back"
    export(runs["pair"], out, saved_tiny_bert)
    ptv2(
        "import", str(out), "--from", "peft", str(back), "--like", str(runs["pair"]), "--backbone", str(saved_tiny_bert)
    )
    assert predicted_scores(back, saved_tiny_bert, tmp_path / "b").equal(
        predicted_scores(runs["pair"], saved_tiny_bert, tmp_path / "a")
    )


def test_lora_exports_as_a_peft_lora_adapter_and_imports_back(runs, saved_tiny_bert, tmp_path):
    """A LoRA run is a PEFT LoRA adapter: PeftModel's forward (segment ids pass through) gives predict's
    probabilities; imported back, the same tensors bit for bit."""
    out, back = tmp_path / "adapter", tmp_path / "back"
    result = export(runs["lora"], out, saved_tiny_bert)
    assert "LoRA r 8" in result.stdout and "computes ptv2's function" in result.stdout
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["peft_type"] == "LORA" and sorted(settings["target_modules"]) == ["query", "value"]
    expected = predicted_scores(runs["lora"], saved_tiny_bert, tmp_path / "predict")
    model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(saved_tiny_bert), str(out)).eval()
    heads = load_file(str(out / "ptv2_heads.safetensors"))
    assert any(name.endswith("lora_B.default.weight") and p.abs().sum() > 0 for name, p in model.named_parameters())
    with torch.no_grad():
        theirs = classify(model(**rte_batch(saved_tiny_bert)).last_hidden_state, heads)
    assert (theirs - expected).abs().max().item() <= 1e-5

    ptv2(
        "import", str(out), "--from", "peft", str(back), "--like", str(runs["pair"]), "--backbone", str(saved_tiny_bert)
    )
    original, imported = (
        load_file(str(runs["lora"] / "prompt.safetensors")),
        load_file(str(back / "prompt.safetensors")),
    )
    assert imported.keys() == original.keys() and all(torch.equal(imported[k], original[k]) for k in imported)
    with safe_open(str(back / "prompt.safetensors"), framework="pt") as handle:
        config = json.loads(handle.metadata()["config"])
    assert config["prompt"]["method"] == "lora" and config["prompt"]["r"] == 8
    assert predicted_scores(back, saved_tiny_bert, tmp_path / "b").sub(expected).abs().max() <= 1e-6


def test_the_adapter_names_a_hub_backbone_never_a_local_folder(tmp_path, monkeypatch):
    assert portable_base("prajjwal1/bert-tiny") == "prajjwal1/bert-tiny"
    assert portable_base(str(tmp_path)) is None
    (tmp_path / "bert").mkdir()
    monkeypatch.chdir(tmp_path)  # a relative folder that looks like a hub id is still a folder
    assert portable_base("bert") is None


# ------------------------------------------------------------------------------------------- refusals


def fresh_python(*lines: str) -> subprocess.CompletedProcess:
    code = "\n".join(["import sys", "from ptv2.commands import export", *lines])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_argument_and_folder_errors_come_before_torch_loads(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "adapter_config.json").write_text("[1, 2]")
    result = fresh_python(
        "try:\n    export.main(['run'])\nexcept SystemExit as exit:\n    print('exit', exit.code)",
        f"print('export', export.main(['run', '--to', 'peft', {str(tmp_path / 'file')!r}]))",
        f"print('import', export.import_main([{str(tmp_path / 'listed')!r}, '--from', 'peft', 'o', '--like', 'r']))",
        "print('torch loaded:', 'torch' in sys.modules)",
    )
    assert "exit 2" in result.stdout and "export 2" in result.stdout and "import 2" in result.stdout
    assert "torch loaded: False" in result.stdout
    errors = result.stderr.splitlines()
    assert f"ptv2: error: {tmp_path / 'file'} is a file, not a folder; name a folder to write into" in errors
    assert (
        f"ptv2: error: {tmp_path / 'listed' / 'adapter_config.json'} holds a list, not PEFT's settings; refused"
        in errors
    )


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"peft_type": "IA3"}, "holds a IA3 adapter; only PREFIX_TUNING and LORA import"),
        ({"peft_type": "PREFIX_TUNING"}, "num_virtual_tokens=None is not a whole number >= 1"),
        ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": "4"}, "num_virtual_tokens='4' is not a whole number"),
        ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 0}, "num_virtual_tokens=0 is not a whole number"),
        ({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query"], "use_dora": True}, "plain LoRA"),
    ],
)
def test_odd_adapter_configs_are_one_line(tmp_path, settings, message):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    result = ptv2("import", str(adapter), "--from", "peft", str(tmp_path / "out"), "--like", "nowhere", check=False)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture
def exported(runs, saved_tiny_bert, tmp_path) -> Path:
    out = tmp_path / "adapter"
    export(runs["tagging"], out, saved_tiny_bert)
    return out


def refused_import(adapter: Path, like: Path, out: Path, *flags: str) -> str:
    result = ptv2("import", str(adapter), "--from", "peft", str(out), "--like", str(like), *flags, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptv2: error: ")
    return lines[0]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: {"prompt_embeddings": torch.full_like(t["prompt_embeddings"], float("nan"))}, "NaN or infinite"),
        (lambda t: {"prompt_embeddings": t["prompt_embeddings"].long()}, "torch.int64 numbers, not floating point"),
        (lambda t: {"prompt_embeddings": t["prompt_embeddings"][:, :-1].contiguous()}, "has shape (4, 127)"),
        (lambda t: {**t, "extra": t["prompt_embeddings"].clone()}, "unexpected tensor extra"),
    ],
)
def test_imported_prefixes_are_checked_like_checkpoints(runs, saved_tiny_bert, exported, tmp_path, change, message):
    tensors = load_file(str(exported / "adapter_model.safetensors"))
    save_file(change(tensors), str(exported / "adapter_model.safetensors"))
    line = refused_import(exported, runs["tagging"], tmp_path / "out", "--backbone", str(saved_tiny_bert))
    assert message in line and not (tmp_path / "out").exists()


def test_a_heads_file_holds_only_the_runs_heads(runs, saved_tiny_bert, exported, tmp_path):
    heads = load_file(str(exported / "ptv2_heads.safetensors"))
    save_file({**heads, "prompt.embedding.weight": torch.zeros(4, 128)}, str(exported / "ptv2_heads.safetensors"))
    line = refused_import(exported, runs["tagging"], tmp_path / "out", "--backbone", str(saved_tiny_bert))
    assert "unexpected tensor prompt.embedding.weight" in line and not (tmp_path / "out").exists()


def test_import_never_reads_a_backbone_folder_from_the_adapter(runs, exported, tmp_path):
    """--like RUN was trained on a local folder (not taken from checkpoints): the adapter's own
    base_model_name_or_path is never used in its place."""
    settings = json.loads((exported / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(tmp_path / "elsewhere")
    (exported / "adapter_config.json").write_text(json.dumps(settings))
    line = refused_import(exported, runs["tagging"], tmp_path / "out")
    assert "was trained on a local backbone folder; pass --backbone DIR" in line


def test_import_never_replaces_a_runs_prompt_and_export_never_an_adapter(runs, saved_tiny_bert, exported, tmp_path):
    run = runs["tagging"]
    before = (run / "prompt.safetensors").read_bytes()
    line = refused_import(exported, run, run, "--backbone", str(saved_tiny_bert), "--overwrite")
    assert "is a trained run; its prompt is never replaced" in line
    assert (run / "prompt.safetensors").read_bytes() == before

    again = export(run, exported, saved_tiny_bert, check=False)
    assert again.returncode == 2 and "already holds adapter_config.json; pass --overwrite" in again.stderr
    assert export(run, exported, saved_tiny_bert, "--overwrite").returncode == 0

    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target", target_is_directory=True)
    result = export(run, link, saved_tiny_bert, check=False)
    assert result.returncode == 2 and "is a link" in result.stderr and not (tmp_path / "target").exists()


def test_export_refuses_methods_peft_has_no_format_for(saved_tiny_bert, tmp_path):
    run = train_tiny(saved_tiny_bert, tmp_path / "run", CONLL03, "prompt=prompt_tuning")
    result = export(run, tmp_path / "out", saved_tiny_bert, check=False)
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    exporting = "ptv2 (as prefix) and lora (as lora) and ptp (as prefix)"
    assert f"prompt.method=prompt_tuning: only {exporting} export" in result.stderr


@pytest.mark.parametrize("kind", ["prefix", "lora"])
def test_an_adapter_saved_by_peft_itself_imports_as_the_same_function(runs, saved_tiny_bert, tmp_path, kind):
    """An adapter PEFT wrote (no ptv2 files in it) imports onto --like RUN's heads; ptv2's model from the imported
    checkpoint computes what PeftModel's forward does (a prefix from PEFT numbers tokens from P: shift_positions)."""
    torch.manual_seed(5)
    if kind == "prefix":
        settings = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3)
    else:
        settings = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "key"], lora_dropout=0.0)
    theirs = peft.get_peft_model(AutoModel.from_pretrained(saved_tiny_bert), settings)
    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.5)
    theirs.save_pretrained(tmp_path / "adapter")
    back = tmp_path / "back"
    ptv2("import", str(tmp_path / "adapter"), "--from", "peft", str(back), "--like", str(runs["tagging"]),
         "--backbone", str(saved_tiny_bert))  # fmt: skip
    saved = checkpoint.stored_config(back)
    assert saved.prompt.method == ("ptv2" if kind == "prefix" else "lora")
    assert saved.prompt.get("shift_positions", False) is (kind == "prefix")  # LoRA has no such setting
    saved.backbone.name_or_path = str(saved_tiny_bert)
    encoder, _ = backbone.load_encoder(saved.backbone)
    labels = json.loads(checkpoint.read_metadata(back)["labels"])["conll03"]
    ours = PromptModel(encoder, saved.prompt, {"conll03": (TokenClassificationHead, len(labels))}, 0.0).eval()
    checkpoint.load(back, ours, use_folded=True)
    heads = load_file(str(back / "prompt.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(saved_tiny_bert)
    batch = dict(tokenizer([["EU", "rejects", "German", "call"], ["Peter"]], is_split_into_words=True,
                           padding=True, return_tensors="pt"))  # fmt: skip
    with torch.no_grad():
        hidden = theirs.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        expected = hidden @ heads["heads.conll03.linear.weight"].T + heads["heads.conll03.linear.bias"]
        logits = ours(batch)
    real = batch["attention_mask"].bool()
    assert (logits[real] - expected[real]).abs().max().item() <= 1e-5
