"""The one training loop (ptv2.loop) against figures recorded from the two loops it replaced.

tests/fixtures/loop_records.json holds, per case, what `ptv2 train` (single jobs) and the packed launcher (groups)
gave before they became one loop: every epoch's train loss and dev metrics, the test score at the best epoch, and
each trained tensor's sum and absolute sum. It was written once by `python tests/test_loop.py --record` on the code
before the change; the test compares today's code with it, never with itself. On the machine that recorded them the
figures were equal to the last bit; elsewhere BLAS may sum in another order, so the comparison allows 1e-5 relative.

Cases: tiny BERT, RoBERTa (shifted positions), DeBERTa-v2 and Llama with dropout on; fine-tuning and prompt tuning
(groups of one that never pack); tagging with a test split; generation; a packed group of two jobs, one block per
forward and both blocks in one forward.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # conftest's helpers when run as a script (--record)

from conftest import RTE, ptv2  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
RECORDS = FIXTURES / "loop_records.json"
ASSET = Path(__file__).parents[1] / "src" / "ptv2" / "assets" / "tiny-bert"
SHAPE = dict(vocab_size=197, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
FAMILIES = {
    "roberta": dict(model_type="roberta", max_position_embeddings=200, type_vocab_size=2, pad_token_id=0),
    "deberta-v2": dict(
        model_type="deberta-v2",
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=16,
        max_relative_positions=-1,
        position_biased_input=False,
        type_vocab_size=0,
        pad_token_id=0,
    ),
}
DECODER = FIXTURES / "decoders"
RUN = ["logger=none", "trainer.epochs=2", "trainer.batch_size=4", "trainer.eval_batch_size=4", "trainer.progress=false"]
RTE_TASK = [f"task.data_dir={RTE}"]
TAGGING = ["task=conll03", f"task.data_dir={FIXTURES / 'tagging'}"]
TAGGING += [f"task.files.{split}=conll03_iob1.txt" for split in ("train", "dev", "test")]
LLAMA = ["backbone.name=tiny-llama", f"backbone.name_or_path={DECODER / 'llama'}"]
LLAMA += [f"backbone.tokenizer={DECODER / 'tokenizer'}"]
GENERATION = ["task=generation", f"task.data_dir={FIXTURES / 'generation'}", "task.options.max_new_tokens=4"]


def family_folder(family: str, root: Path) -> list[str]:
    folder = root / family
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer_config.json"):
        (folder / name).write_bytes((ASSET / name).read_bytes())
    (folder / "config.json").write_text(json.dumps({**SHAPE, **FAMILIES[family]}))
    return [f"backbone.name={family}", f"backbone.name_or_path={folder}"]


# name -> (sweep?, overrides); a sweep's figures are recorded per job folder.
CASES = {
    "bert": (False, [*RTE_TASK, "prompt.length=3"]),
    "roberta": (False, [*RTE_TASK, "prompt.length=3", "prompt.shift_positions=true", "@roberta"]),
    "deberta-v2": (False, [*RTE_TASK, "prompt.length=3", "@deberta-v2"]),
    "llama": (False, [*RTE_TASK, *LLAMA, "prompt.length=4"]),
    "finetune": (False, [*RTE_TASK, "prompt=finetune", "optimizer.lr=1e-3"]),
    "prompt_tuning": (False, [*RTE_TASK, "prompt=prompt_tuning", "prompt.length=3"]),
    "tagging": (False, [*TAGGING, "prompt.length=3"]),
    "generation": (False, [*GENERATION, *LLAMA, "prompt.length=4", "trainer.epochs=1"]),
    "packed": (True, [*RTE_TASK, "hydra/launcher=packed", "prompt.length=2,5"]),
    "packed-one-forward": (True, [*RTE_TASK, "hydra/launcher=packed", "hydra.launcher.jobs_per_forward=2"]),
}
CASES["packed-one-forward"][1].append("optimizer.lr=1e-2,3e-2")


def figures(run_dir: Path) -> dict:
    """What a finished run is judged by: its epochs (timings left out), its test score, its trained tensors."""
    from ptv2.runs import resume as state

    results = json.loads((run_dir / "results.json").read_text())
    epochs = [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in results["history"]]
    trained = state.read(run_dir / state.STATE_DIR / state.STATE_FILE)["trainable"]
    tensors = {k: [v.double().sum().item(), v.double().abs().sum().item()] for k, v in sorted(trained.items())}
    return {"epochs": epochs, "test": results.get("test_at_best"), "steps": results["steps"], "tensors": tensors}


def run_case(name: str, root: Path) -> dict:
    sweep, overrides = CASES[name]
    args = ["backbone=tiny", *RUN]
    for item in overrides:
        args += family_folder(item[1:], root) if item.startswith("@") else [item]
    folder = root / name
    if sweep:
        ptv2("train", "-m", *args, f"hydra.sweep.dir={folder}")
        return {job.name: figures(job) for job in sorted(folder.iterdir()) if job.is_dir()}
    ptv2("train", *args, f"hydra.run.dir={folder}")
    return figures(folder)


def assert_close(ours, theirs, where: str = "") -> None:
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), where
        for key in theirs:
            assert_close(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float) and not isinstance(ours, bool):
        assert math.isclose(ours, theirs, rel_tol=1e-5, abs_tol=1e-7), f"{where}: {ours} != {theirs}"
    else:
        assert ours == theirs, f"{where}: {ours} != {theirs}"


@pytest.mark.parametrize("name", list(CASES))
def test_the_loop_gives_the_recorded_figures(name, tmp_path):
    recorded = json.loads(RECORDS.read_text())[name]
    assert_close(run_case(name, tmp_path), recorded, name)


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        records = {name: run_case(name, Path(folder)) for name in CASES}
    RECORDS.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORDS}")
