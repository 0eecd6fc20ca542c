"""`ptv2 predict RUN_DIR` (or ckpt=RUN_DIR): predictions of one or several trained prompts on a split or on a file.

Several checkpoints (ckpt=[a,b,c]) are served on ONE frozen backbone (see serving.py); each writes its task's
official prediction file when its task type has `write_predictions`, else a generic JSON-lines file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ptv2.config import task_members
from ptv2.data import prepare_split
from ptv2.engine import Member, predict
from ptv2.errors import UserError
from ptv2.io import declare, refuse_links, write_json, write_jsonl
from ptv2.io import output_folder as output_folder_of
from ptv2.runs import checkpoint
from ptv2.runs.checkpoint import checkpoint_config
from ptv2.serving import PromptServer
from ptv2.tasks import task_type

log = logging.getLogger("ptv2")
INPUT_SPLIT = "test"  # input=FILE is read as the test split: labels optional, readers know the format
# In output_dir (or the run folder), per checkpoint served in a subfolder of its name when several are: the task's
# official prediction files or <task>-<split>.jsonl, <task>-scores.jsonl for input=FILE, and predict.json.
OUTPUTS = declare(
    "predict", "config.yaml", ".hydra/*.yaml", "predict.log", "predict.json", "*.jsonl", "*.tsv", "*.json",
    "*/*.jsonl", "*/*.json",
)  # fmt: skip


def checkpoint_paths(ckpt) -> list[str]:
    if not ckpt:
        raise UserError("ptv2 predict needs a checkpoint: ckpt=RUN_DIR (or ckpt=[RUN_A,RUN_B] for several)")
    paths = [str(p) for p in ckpt] if isinstance(ckpt, (list, tuple, ListConfig)) else [str(ckpt)]
    for path in paths:
        checkpoint.resolve(path)  # a clear error for a missing one before any loading
    return paths


def with_input_file(saved: DictConfig, input_file: str) -> DictConfig:
    """The run config with its task reading `input_file` (in the task's own format) as the split INPUT_SPLIT."""
    path = Path(input_file).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"input={input_file} is not a file: pass a file in the task's own format")
    if saved.task.members:
        raise UserError("input=FILE needs a single-task checkpoint: a multi-task one does not say which task it is")
    with open_dict(saved.task):
        saved.task.data_dir = str(path.parent)
        saved.task.files = {**saved.task.files, INPUT_SPLIT: path.name}
    return saved


def output_folder(cfg: DictConfig, run_dir: Path) -> Path:
    """Where the predictions go: output_dir=DIR, else the run folder. Earlier predictions there (a predict.json)
    are kept unless trainer.overwrite=true; nothing is written to probe the folder."""
    if not cfg.output_dir:
        return run_dir
    folder = output_folder_of(cfg.output_dir, "output_dir=")
    if (folder / "predict.json").exists() and not cfg.trainer.overwrite:
        raise UserError(
            f"{folder} already holds predictions (predict.json); replace them with trainer.overwrite=true, or pass "
            "another output_dir=DIR"
        )
    return folder


def write_generic(member: Member, split: str, outputs: list[np.ndarray], folder: Path) -> list[Path]:
    """<name>-<split>.jsonl: one line per feature, the argmax label name (a list of them for per-token outputs)."""
    labels = list(member.task.labels)
    examples = member.splits[split].examples
    lines = []
    for index, scores in enumerate(outputs):
        predicted = np.asarray(scores).argmax(-1)
        names = [labels[int(i)] if int(i) < len(labels) else int(i) for i in np.atleast_1d(predicted)]
        line = {"index": index, "label": names if np.ndim(predicted) else names[0]}
        if len(outputs) == len(examples) and "idx" in examples[index]:
            line["idx"] = examples[index]["idx"]
        lines.append(line)
    return [write_jsonl(folder / f"{member.name}-{split}.jsonl", lines)]


def write_scores(member: Member, split: str, outputs: list[np.ndarray], folder: Path) -> list[Path]:
    """<name>-scores.jsonl for a user's file (input=FILE): one line per input record, in file order (numbered from 0,
    as the task's own prediction file numbers them), with the
    predicted label and every label's probability (softmax of the head's scores). Only for one score vector per
    record (classification, multiple choice); per-token and generated outputs have their own files."""
    labels = list(member.task.labels)
    examples = member.splits[split].examples
    if len(outputs) != len(examples) or any(np.ndim(o) != 1 or len(o) != len(labels) for o in outputs):
        return []
    lines = []
    for number, scores in enumerate(outputs):  # from 0, as the task's own file numbers the records (idx)
        scores = np.asarray(scores, dtype=np.float64)
        probabilities = np.exp(scores - scores.max())
        probabilities /= probabilities.sum()
        best = int(probabilities.argmax())
        shown = {label: round(float(p), 6) for label, p in zip(labels, probabilities, strict=True)}
        lines.append({"record": number, "label": labels[best], "scores": shown})
    return [write_jsonl(folder / f"{member.name}-scores.jsonl", lines)]


def run(cfg: DictConfig, run_dir: Path) -> dict:
    paths = checkpoint_paths(cfg.ckpt)
    configs = [checkpoint_config(OmegaConf.merge(cfg, {"ckpt": path})) for path in paths]
    split = cfg.split
    if cfg.input:
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        given = [item for item in overrides if item.lstrip("+").startswith("split=")]
        if given:  # a user's file is read as the test split: a split of the task's own files would be ignored
            raise UserError(
                f"input=FILE and {given[-1]} do not go together: input= predicts the file; drop {given[-1]}"
            )
        tasks = sorted({str(saved.task.get("name")) for saved in configs})
        if len(tasks) > 1:  # the file is in one task's format
            raise UserError(
                f"input=FILE takes checkpoints of one task (these are of {', '.join(tasks)}); run predict once per task"
            )
        configs, split = [with_input_file(saved, cfg.input) for saved in configs], INPUT_SPLIT
    folder = output_folder(cfg, run_dir)
    server = PromptServer.from_checkpoints(paths, configs)
    first = configs[0]
    accelerator = Accelerator(mixed_precision=first.trainer.precision, cpu=first.trainer.cpu)
    model = accelerator.prepare(server)
    summary = {"split": split, "input": cfg.input, "served": []}
    for (model_name, saved), path in zip(server.configs.items(), paths, strict=True):
        for head_name, task in task_members(saved.task):
            served = model_name if len(task_members(saved.task)) == 1 else f"{model_name}/{head_name}"
            kind = task_type(task.type)
            try:
                prepared = prepare_split(task, split, server.tokenizer, kind, saved.trainer.cache_dir)
            except UserError as error:
                hint = checkpoint.trained_data_hint(path) if not task.get("data_dir") else ""
                raise UserError(f"{error}{hint}" if "task.data_dir" in str(error) else str(error)) from None
            member = Member(served, task, kind, {split: prepared})
            shown = f"input={cfg.input}" if cfg.input else split  # a user's file is read as the test split
            log.info("%s: predicting %d examples of %s ...", served, len(prepared.examples), shown)
            outputs = predict(
                model, member, split, server.tokenizer, accelerator, saved.trainer.eval_batch_size, progress=True
            )
            target = folder / served if len(server.owner) > 1 else folder
            refuse_links(folder, target / "file")
            target.mkdir(parents=True, exist_ok=True)
            if hasattr(kind, "write_predictions"):
                files = kind.write_predictions(task, prepared, outputs, target)
            else:
                files = write_generic(member, split, outputs, target)
            if cfg.input:
                files += write_scores(member, split, outputs, target)
            summary["served"].append(
                {
                    "name": served,
                    "checkpoint": str(checkpoint.resolve(path)),
                    "task": task.name,
                    "examples": len(prepared.examples),
                    "files": [str(f) for f in files],
                }
            )
            log.info(
                "%s: %d predictions on %s -> %s", served, len(prepared.examples), shown, ", ".join(map(str, files))
            )
    written = write_json(folder / "predict.json", summary)
    log.info("predict.json (what was written) in %s", written.absolute())
    return summary
