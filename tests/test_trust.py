"""Trust under attack and accident, round two (issue 22): links planted in run folders, finished runs, values
checked before work starts, saved progress from a file, misleading messages, refused starts, requeued jobs.

Each refusal is one line `ptv2: error: ...` naming what is wrong and the fix; a refused start leaves no folder; a
finished run's folder stays byte-identical (its lock file and log included); no write leaves the run folder.
`ptv2 table` input is tested in test_table_input.py, `ptv2 bench` failures in test_bench.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import RTE, ptv2_subprocess
from safetensors.torch import load_file, save_file
from test_bad_input import BASE, one_line_error, run

from ptv2.errors import UserError, short_line
from ptv2.runs import checkpoint, rundir
from ptv2.runs.resume import STATE_DIR, STATE_FILE

TRAIN = ["train", *BASE, f"task.data_dir={RTE}"]


def everything(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder` with its bytes (a link: its target), the lock file and logs included."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = f"-> {os.readlink(path)}" if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
    return found


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run(*TRAIN, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


# ------------------------------------------------------------------------------------- links inside a run folder

FILE_LINKS = [".ptv2.lock", "config.yaml", "FAILED", "train.log", "results.json", "prompt.safetensors"]
FILE_LINKS += [".hydra/config.yaml", ".hydra/overrides.yaml", "state/training_state.pt"]
FOLDER_LINKS = [".hydra", "state", "wandb"]


@pytest.mark.parametrize("name", FILE_LINKS + FOLDER_LINKS)
def test_a_link_planted_in_a_run_folder_is_refused_and_nothing_is_written_through_it(name, tmp_path):
    outside, run_dir = tmp_path / "outside", tmp_path / "run"
    outside.mkdir()
    target = outside / "dir" if name in FOLDER_LINKS else outside / "precious"
    target.mkdir() if name in FOLDER_LINKS else target.write_text("precious\n")
    link = run_dir / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    before = everything(outside), everything(run_dir)
    message = one_line_error(run(*TRAIN, f"hydra.run.dir={run_dir}"))
    assert "symbolic link" in message and f"{name} -> {target}" in message and "remove it" in message
    assert (everything(outside), everything(run_dir)) == before


def test_a_link_in_a_finished_run_received_from_elsewhere_is_refused_on_resume(finished, tmp_path):
    received = tmp_path / "received"
    shutil.copytree(finished, received)
    (received / "config.yaml").unlink()
    (received / "config.yaml").symlink_to(tmp_path / "bashrc")
    message = one_line_error(run(*TRAIN, f"hydra.run.dir={received}", "trainer.resume=true"))
    assert "config.yaml -> " in message and not (tmp_path / "bashrc").exists()


def test_a_link_in_a_sweep_job_folder_is_refused_before_hydra_opens_its_log(tmp_path):
    sweep, target = tmp_path / "sweep", tmp_path / "elsewhere.log"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "train.log").symlink_to(target)
    message = one_line_error(run(*TRAIN, "-m", "prompt.length=2,3", f"hydra.sweep.dir={sweep}"))
    assert "train.log -> " in message and not target.exists() and sorted(p.name for p in sweep.iterdir()) == ["0"]


def test_a_dangling_link_as_the_run_folder_is_refused(tmp_path):
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "nowhere")
    message = one_line_error(run(*TRAIN, f"hydra.run.dir={link}"))
    assert message == (
        f"ptv2: error: the run directory {link} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist; "
        "remove the link or pass hydra.run.dir=DIR with a real folder"
    )
    assert not (tmp_path / "nowhere").exists()


def test_the_failed_marker_replaces_a_link_and_never_follows_it(tmp_path):
    target = tmp_path / "precious"
    target.write_text("precious\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "FAILED").symlink_to(target)
    rundir.mark_failed(None, tmp_path / "run")  # no Hydra config: the marker alone
    assert target.read_text() == "precious\n"
    assert not (tmp_path / "run" / "FAILED").is_symlink() and (tmp_path / "run" / "FAILED").read_text()


def test_a_lock_that_is_a_folder_or_another_users_file_is_named(tmp_path, monkeypatch):
    (tmp_path / rundir.LOCK_FILE).mkdir()
    with pytest.raises(UserError, match=r"\.ptv2\.lock is a folder, not ptv2's lock file: remove it \(rmdir "):
        rundir.RunLock(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / rundir.LOCK_FILE).write_text("")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(rundir.os, "open", denied)
    monkeypatch.setattr(rundir.os, "getuid", lambda: (other / rundir.LOCK_FILE).stat().st_uid + 1)
    with pytest.raises(UserError, match=r"belongs to another user \(.+\): the run folder is theirs; choose another"):
        rundir.RunLock(other)


# ------------------------------------------------------------------------------------- finished runs stay finished


@pytest.mark.parametrize(
    ("env", "extra"),
    [
        ({"RANK": "1"}, []),  # a RANK left in the environment
        ({"RANK": "1", "WORLD_SIZE": "2"}, []),  # a follower process of a multi-process launch
        ({"RANK": "3"}, ["optimizer.lr=0.5"]),
    ],
)
def test_rank_set_still_refuses_a_finished_run_and_changes_nothing(finished, env, extra):
    before = everything(finished)
    message = one_line_error(run(*TRAIN, f"hydra.run.dir={finished}", *extra, env=env))
    assert "already holds a run" in message
    assert everything(finished) == before


@pytest.mark.parametrize("resume", ["true", "auto"])
def test_resuming_a_finished_run_does_nothing_and_writes_nothing(finished, resume):
    before = everything(finished)
    result = run(*TRAIN, f"hydra.run.dir={finished}", f"trainer.resume={resume}")
    assert result.returncode == 0 and result.stderr.strip().splitlines() == [
        f"ptv2: {finished} holds a finished run (results.json): nothing to resume, nothing written"
    ]
    assert everything(finished) == before


def test_resuming_a_finished_packed_sweep_leaves_every_job_folder_byte_identical(tmp_path):
    sweep = tmp_path / "sweep"
    args = [*TRAIN, "-m", "hydra/launcher=packed", "prompt.length=2,3", f"hydra.sweep.dir={sweep}"]
    first = run(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {job: everything(sweep / job) for job in ("0", "1")}
    again = run(*args, "trainer.resume=true")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to resume" in again.stderr and "Traceback" not in again.stderr
    assert {job: everything(sweep / job) for job in ("0", "1")} == before


# ------------------------------------------------------------------------------------- values checked before work


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["task=generation", "task.options.bleu_tokenize=nope"], "task.options.bleu_tokenize=nope is unknown; choose"),
        (["task=generation", "task.options.max_new_tokens=0"], "task.options.max_new_tokens=0 is out of range"),
        (["task=generation", "task.options.max_target_length=1"], "1 leaves every answer empty"),
        (["task=generation", "task.max_length=60"], "task.max_length=60 leaves no room for a prompt"),
        ([f"task.name={'a' * 300}"], "is 300 characters long; use at most 100"),
        (["prompt.length=100000"], "prompt.length=100000 is out of range for prompt.method=ptv2; use an integer in"),
        (["trainer.seed=99999999999"], "trainer.seed=99999999999 is out of range"),
        (["task.head=lm"], "task.head=lm does not fit task.type=classification; use task.head=linear or pooler"),
        (["+trainer.foo=1"], "+trainer.foo=1: trainer.foo is not a setting ptv2 reads, so it would change nothing"),
        (["+prompt.lenght=3"], "prompt.lenght is not a setting of any prompt method; did you mean prompt.length?"),
        (["trainer.epoch=3"], "Could not override 'trainer.epoch' (Key 'epoch' not in 'TrainerConfig'); did you mean"),
        (["+lr=0.1"], "did you mean optimizer.lr?"),
        (["-m", "hydra/launcher=packed", "hydra.launcher.jobs_per_forward=0"], "jobs_per_forward=0 is out of range"),
        (["trainer.resume=[1]"], "trainer.resume=[1] is not valid; use true, false, auto or the folder"),
        (["trainer.resume=2.5"], "trainer.resume=2.5 is not valid"),
    ],
)
def test_a_bad_value_is_refused_before_work_starts_and_leaves_no_folder(overrides, expected, tmp_path):
    run_dir = tmp_path / "run"
    message = one_line_error(run(*TRAIN, *overrides, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}"))
    assert expected in message and "+trainer.epoch" not in message
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("prompt.length", 10**9, "prompt.length=1000000000 is out of range"),
        ("trainer.seed", 2**40, "trainer.seed=1099511627776 is out of range"),
        ("task.head", "lm", "task.head=lm does not fit task.type=classification"),
        ("task.type", "generation", "task.head=linear does not fit task.type=generation; use task.head=lm"),
    ],
)
def test_checkpoint_metadata_is_checked_before_a_model_is_built(finished, key, value, expected, tmp_path):
    tensors = load_file(str(finished / checkpoint.FILENAME))
    metadata = checkpoint.read_metadata(finished)
    config = json.loads(metadata["config"])
    group, name = key.split(".")
    config[group][name] = value
    crafted = tmp_path / checkpoint.FILENAME
    save_file(tensors, str(crafted), metadata={**metadata, "config": json.dumps(config)})
    message = one_line_error(
        run("eval", f"ckpt={crafted}", f"task.data_dir={RTE}", f"hydra.run.dir={tmp_path / 'eval'}")
    )
    assert message.startswith(f"ptv2: error: {crafted}: the stored run config is refused: ") and expected in message
    assert not (tmp_path / "eval").exists()


def test_a_task_type_that_does_not_fit_the_reader_is_one_line(tmp_path):
    message = one_line_error(run(*TRAIN, "task.type=span", f"hydra.run.dir={tmp_path / 'run'}"))
    assert "task rte: task.type=span needs the field 'question' that task.reader=superglue does not give" in message
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- resume state from a file


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: p.update(surprise=1), "unexpected: ['surprise']"),
        (lambda p: p.pop("losses"), "missing: ['losses']"),
        (lambda p: p.update(epoch="two"), "progress.epoch='two' is not a count"),
        (lambda p: p.update(step=-3), "progress.step='-3' is not a count"),
        (lambda p: p.update(losses="abc"), "progress.losses='abc' is not a list of numbers"),
        (lambda p: p.update(history=[1, 2]), "is not a list of records"),
        (lambda p: p.update(best_value="high"), "progress.best_value='high' is not a number"),
        (lambda p: p.update(best=[1]), "progress.best='[1]' is not null or a mapping"),
    ],
)
def test_unexpected_keys_or_types_in_saved_progress_are_one_line(finished, change, expected, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    path = run_dir / STATE_DIR / STATE_FILE
    state = torch.load(path, weights_only=True)
    progress = json.loads(state["progress"])
    change(progress)
    state["progress"] = json.dumps(progress)
    (run_dir / "results.json").unlink()  # an interrupted run, so the resume reads its state
    torch.save(state, path)
    message = one_line_error(run(*TRAIN, f"hydra.run.dir={run_dir}", "trainer.resume=true"))
    assert f"trainer.resume: {path} is not a ptv2 training state (" in message and expected in message


def test_malformed_rng_or_tensors_in_a_state_are_one_line(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "results.json").unlink()
    path = run_dir / STATE_DIR / STATE_FILE
    for key, value, expected in [("rng", {"python": 1}, "random number generator"), ("trainable", [1], "trainable")]:
        state = torch.load(path, weights_only=True)
        state[key] = value
        torch.save(state, path)
        message = one_line_error(run(*TRAIN, f"hydra.run.dir={run_dir}", "trainer.resume=true"))
        assert expected in message
        shutil.copyfile(finished / STATE_DIR / STATE_FILE, path)


# ------------------------------------------------------------------------------------- messages that mislead


def test_an_absolute_path_in_task_files_is_named_with_the_fix(tmp_path):
    message = one_line_error(run(*TRAIN, "task.files.train=/data/rte/train.jsonl", f"hydra.run.dir={tmp_path}/r"))
    assert message == (
        "ptv2: error: task.files.train=/data/rte/train.jsonl is not a file name: task.files names files inside "
        f"task.data_dir (now {RTE}); pass task.data_dir=/data/rte task.files.train=train.jsonl"
    )


def test_an_invalid_split_lists_the_valid_ones(finished, tmp_path):
    message = one_line_error(
        run("eval", f"ckpt={finished}", "split=nope", f"task.data_dir={RTE}", f"hydra.run.dir={tmp_path / 'e'}")
    )
    assert message == "ptv2: error: task rte: 'nope' is not one of its splits; use one of dev, test, train"
    assert not (tmp_path / "e").exists()


def test_an_unreadable_checkpoint_says_why(finished, monkeypatch):
    monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: Path(path).is_dir())
    with pytest.raises(UserError) as caught:
        checkpoint.resolve(finished)
    assert str(caught.value) == (
        f"cannot read {finished / checkpoint.FILENAME} (permission denied): it is yours: chmod u+r "
        f"{finished / checkpoint.FILENAME}"
    )


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_safetensors_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    """safetensors creates its files 0600 by itself; a team's shared run folder needs the umask's group bits."""
    from ptv2.io import write_safetensors

    previous = os.umask(umask)
    try:
        path = write_safetensors(tmp_path / "prompt.safetensors", {"x": torch.zeros(2)})
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_error_quoting_100000_label_names_is_cut():
    from ptv2.data.files import label_id

    labels = [f"label{i}" for i in range(100_000)]
    with pytest.raises(UserError) as caught:
        label_id("nope", labels, "train.jsonl:3")
    assert len(str(caught.value)) < 400 and "... (99980 more)]" in str(caught.value)
    assert len(short_line("x" * 10**6)) < 2100


@pytest.mark.parametrize("value", ["é", "naïve"])
def test_a_lexer_error_hints_to_quote(value, tmp_path):
    message = one_line_error(run(*TRAIN, f"task.name={value}", f"hydra.run.dir={tmp_path}/r"))
    hint = """quote a value holding spaces or non-ASCII characters, with the shell's quotes around the whole override"""
    assert message.endswith(f"""{hint}: 'key="a value"'; `ptv2 train --help` lists the options""")


def test_an_unquoted_space_hints_to_quote(tmp_path):
    message = one_line_error(run(*TRAIN, "task.name=two", "words", f"hydra.run.dir={tmp_path}/r"))
    assert "missing EQUAL" in message and "quote a value holding spaces" in message


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["a=1", "--cfg", "job", "-m", "b=2"], ["--cfg", "job", "-m", "a=1", "b=2"]),
        (["a=1", "-p", "trainer", "--cfg", "job"], ["-p", "trainer", "--cfg", "job", "a=1"]),
        (["--info", "a=1"], ["a=1", "--info"]),  # --info with no topic must not take an override as its topic
        (["--info", "defaults", "a=1"], ["--info", "defaults", "a=1"]),
        (["--cfg", "a=1"], ["a=1", "--cfg"]),  # refused by main: --cfg needs job, hydra or all
    ],
)
def test_flags_go_before_the_overrides_with_their_values(args, expected):
    from ptv2.command_line import flags_first

    assert flags_first(args) == expected


def test_a_flag_without_its_value_and_a_list_as_ckpt_are_one_line(tmp_path):
    message = one_line_error(run(*TRAIN, "--cfg", f"hydra.run.dir={tmp_path}/r"))
    assert message == "ptv2: error: --cfg needs job, hydra or all after it (e.g. --cfg job)"
    message = one_line_error(run("eval", "ckpt=[1,2]", f"task.data_dir={RTE}", f"hydra.run.dir={tmp_path}/e"))
    assert "ckpt=[1, 2] is not a checkpoint: pass ckpt=RUN_DIR or a prompt.safetensors file" in message


def test_flags_after_the_overrides_work(tmp_path):
    sweep = tmp_path / "sweep"
    result = run(*TRAIN, "prompt.length=2", f"hydra.sweep.dir={sweep}", "-m")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (sweep / "0" / "results.json").is_file()
    shown = run("train", "task=rte", "backbone=roberta-large", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "ptv2: preset=rte-roberta-large" in shown.stderr and "task:" in shown.stdout


# ------------------------------------------------------------------------------------- a refused start leaves nothing


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["prompt.layers=top:99"], "prompt.layers=top:99 is invalid"),  # a layer check, after the backbone's config
        (["task.data_dir=EMPTY"], "no train file in"),  # a data error
        (["task.files.train=missing.jsonl"], "missing split file"),
    ],
)
def test_a_refused_start_leaves_no_folder(overrides, expected, tmp_path):
    (tmp_path / "empty").mkdir()
    overrides = [o.replace("EMPTY", str(tmp_path / "empty")) for o in overrides]
    run_dir = tmp_path / "run"
    message = one_line_error(run(*TRAIN, *overrides, f"hydra.run.dir={run_dir}"))
    assert expected in message and not run_dir.exists()
    existing = tmp_path / "existing"  # a folder that was there before: it stays, as it was
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    one_line_error(run(*TRAIN, *overrides, f"hydra.run.dir={existing}"))
    assert everything(existing) == {"notes.txt": b"mine"}


# ------------------------------------------------------------------------------------- launchers keep their promises

RESUME_RUN = [
    *TRAIN,
    "trainer=default",
    "trainer.epochs=3",
    "trainer.batch_size=2",  # 12 examples: 6 steps per epoch
    "trainer.eval_batch_size=4",
    "trainer.progress=false",
    "trainer.save_every_steps=2",
]


def test_a_requeued_job_with_resume_auto_continues_and_matches_an_uninterrupted_run(tmp_path):
    reference, requeued = tmp_path / "reference", tmp_path / "requeued"
    assert run(*RESUME_RUN, f"hydra.run.dir={reference}").returncode == 0
    # First start: no state yet, auto starts fresh; Slurm preempts it (SIGKILL) after step 9.
    job = [*RESUME_RUN, f"hydra.run.dir={requeued}"]
    killed = ptv2_subprocess(*job, env={"PTV2_RESUME": "auto", "PTV2_DIE_AT_STEP": "9"}, check=False)
    assert killed.returncode == -9 and not (requeued / "results.json").exists()
    # The requeue: the same command again, with what conf/hydra/launcher/slurm.yaml sets in the job's environment.
    again = run(*job, env={"PTV2_RESUME": "auto"})
    assert again.returncode == 0, again.stderr[-2000:]
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (requeued, reference))
    untimed = [
        [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in x["history"]] for x in (ours, theirs)
    ]
    assert untimed[0] == untimed[1] and ours["best"] == theirs["best"] and ours["steps"] == 18
    # A third start (a requeue after the job finished) changes nothing.
    before = everything(requeued)
    third = run(*job, env={"PTV2_RESUME": "auto"})
    assert third.returncode == 0 and "nothing to resume" in third.stderr and everything(requeued) == before


def test_a_sweep_job_stopped_by_sigterm_then_resumed_loses_its_failed_marker(tmp_path):
    sweep = tmp_path / "sweep"
    job = [*RESUME_RUN, "-m", "prompt.length=2", f"hydra.sweep.dir={sweep}"]
    stopped = ptv2_subprocess(*job, env={"PTV2_DIE_AT_STEP": "3", "PTV2_DIE_SIGNAL": "TERM"}, check=False)
    assert stopped.returncode == 1 and (sweep / "0" / "FAILED").is_file()
    resumed = run(*job, "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (sweep / "0" / "results.json").is_file() and not (sweep / "0" / "FAILED").exists()


def test_the_slurm_launcher_sets_resume_auto_for_its_jobs():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    shown = run("train", "backbone=tiny", "hydra/launcher=slurm", "--cfg", "hydra")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "PTV2_RESUME: auto" in shown.stdout and "max_num_timeout: 3" in shown.stdout
