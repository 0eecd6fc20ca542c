"""SuperGLUE (BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC, WSC), the reader: `load` and the task-type hooks `metrics` and
`write_predictions` (the official metrics and leaderboard files). One module per job: tables.py (per-task facts),
sources.py (official files and hub rows -> flat records), posing.py (flat records -> examples), leaderboard.py.

Canonical examples (JSON-serialisable, the same keys and types for every example of a task):
- classification tasks (all but COPA), read by the core as a sentence pair with a [CLS] head of len(labels) logits:
    {"idx": int, "text_a": str, "text_b": str ("" for one sentence), "label": int (-1 when unlabelled),
     "group": str, "meta": str (JSON)}
- COPA (multiple choice, one logit per (text_a, choice) pair, softmax over the choices):
    {"idx": int, "text_a": str, "choices": [str, str], "label": int (0|1, -1 unlabelled), "group": str, "meta": str}
`idx` is the official idx for the one-example-per-record tasks; MultiRC (one example per answer) and ReCoRD (one
example per candidate entity) number their examples 0..N-1 and keep the official ids in `meta`:
MultiRC meta {"paragraph", "question", "answer"}, group "p<paragraph>-q<question>";
ReCoRD meta {"passage", "query", "entity", "answers"}, group "p<passage>-q<query>". Other tasks: meta "{}",
group str(idx).

How each task is posed follows the official P-tuning v2 code (THUDM/P-tuning-v2, tasks/superglue/dataset.py):
    boolq   text_a question, text_b passage
    cb, rte text_a premise, text_b hypothesis
    copa    text_a "<premise> because" (question cause) or "<premise> so" (effect); choices [choice1, choice2]
    multirc text_a paragraph (HTML markup kept, as the official code does), text_b "<question> <answer>"
    record  text_a passage with "@highlight\\n" turned into "- ", text_b query with @placeholder -> entity
    wic     options.template, see `wic_texts`
    wsc     options.template, see `wsc_texts`

Sources, which give the same examples and label ids:
- local files (task.data_dir set): the official SuperGLUE distribution, train.jsonl / val.jsonl / test.jsonl
  (test without labels); labels as the official files have them (strings, booleans, COPA 0/1, MultiRC 0/1).
- hub rows (task.data_dir unset). Recommended: path `aps/super_glue` (the `super_glue` card, parquet on its main
  branch since "Convert dataset to Parquet (#16)"), at the revision each conf/task YAML pins (`hub:`), name = the
  task name (`wsc`, not `wsc.fixed`: `wsc` is the official file as is, which the official code used; `wsc.fixed`
  rewrites a few span texts). Splits train / validation / test. Columns per config (`idx` int unless said):
    boolq   question, passage, idx, label (0 False, 1 True)
    cb      premise, hypothesis, idx, label (0 entailment, 1 contradiction, 2 neutral)
    copa    premise, choice1, choice2, question, idx, label (0 choice1, 1 choice2)
    multirc paragraph, question, answer, idx {paragraph, question, answer}, label (0 False, 1 True)
    record  passage, query, entities [str], entity_spans {text, start, end}, answers [str], idx {passage, query}
    rte     premise, hypothesis, idx, label (0 entailment, 1 not_entailment)
    wic     word, sentence1, sentence2, start1, start2, end1, end2, idx, label (0 False, 1 True)
    wsc     text, span1_index, span2_index, span1_text, span2_text, idx, label (0 False, 1 True)
  Test rows have label -1 (ReCoRD: answers []). `hub_examples` converts such rows and is what `load` uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ptv2.data.files import hub_rows, local_split, read_jsonl
from ptv2.data.superglue.leaderboard import write_submission
from ptv2.data.superglue.posing import _examples, wic_texts, wsc_texts
from ptv2.data.superglue.sources import _flatten_hub, _flatten_official
from ptv2.data.superglue.tables import LABELS, LOCAL_FILES, SPLITS, SUBMISSION_NAMES, TASKS, TEMPLATES
from ptv2.errors import UserError
from ptv2.metrics.superglue import superglue_metrics

__all__ = [
    "LABELS",
    "SPLITS",
    "SUBMISSION_NAMES",
    "TASKS",
    "TEMPLATES",
    "load",
    "local_files",
    "hub_examples",
    "official_examples",
    "metrics",
    "write_predictions",
    "write_submission",
    "wic_texts",
    "wsc_texts",
]


def local_files(task) -> dict[str, dict[str, list[str]]]:
    return LOCAL_FILES


def load(task, split: str) -> list[dict]:
    """Canonical examples of one split (train|dev|test) of a SuperGLUE task config (see the module docstring).

    With `task.data_dir` set, reads the split's official jsonl (LOCAL_FILES, or `task.files[split]`); otherwise the
    hub rows of `task.hub` (path, name, revision) at split `task.hub_splits[split]`.
    """
    name = _task_name(task)
    if split not in SPLITS:
        raise UserError(f"task {name}: unknown split '{split}'; expected one of {list(SPLITS)}")
    labels = _checked_labels(name, task.get("labels"))
    options = dict(task.get("options") or {})
    labelled = split != "test"

    if task.get("data_dir"):
        _, path = local_split(task, split, LOCAL_FILES)
        records = ((f"{path}:{line}", record) for line, record in read_jsonl(path))
        return official_examples(name, records, labels, options, labelled)

    rows, where = hub_rows(task, split, "official jsonl files")
    return hub_examples(name, rows, labels, options, labelled, where)


def official_examples(
    name: str, records: Iterable[tuple[str, dict]], labels: list[str], options: Mapping, labelled: bool
) -> list[dict]:
    """Canonical examples from official jsonl records, given as (place "file:line", record) pairs."""
    flat = (
        (where, row)
        for where_record, record in records
        for where, row in _flatten_official(name, record, where_record, labelled)
    )
    return _examples(name, flat, labels, options)


def hub_examples(
    name: str, rows: Iterable[Mapping], labels: list[str], options: Mapping, labelled: bool, where: str = "hub"
) -> list[dict]:
    """Canonical examples from hub rows (flat, integer labels, -1 when unlabelled); a pure function of the rows."""
    return _examples(name, _flatten_hub(name, rows, where, labelled), labels, options)


def _task_name(task) -> str:
    name = str(task.get("name") or "").lower()
    if name not in TASKS:
        raise UserError(f"unknown SuperGLUE task '{name}'; expected one of {list(TASKS)}")
    return name


def _checked_labels(name: str, labels) -> list[str]:
    """task.labels as a list, checked against the task's label names (order free, but see LABELS)."""
    labels = [str(label) for label in (labels or [])]
    if name == "copa":
        return labels
    if sorted(labels) != sorted(LABELS[name]) or (name in ("multirc", "record") and labels != LABELS[name]):
        raise UserError(f"task {name}: task.labels={labels}; expected {LABELS[name]}")
    return labels


# ------------------------------------------------------------------------------------ metrics and leaderboard files


def metrics(task, split, scores) -> dict[str, float]:
    """The task type's metrics for SuperGLUE tasks: the official ones (see ptv2.metrics.superglue)."""
    return superglue_metrics(task.name, split.examples, scores)


def write_predictions(task, split, scores, out_dir) -> list:
    """The task type's prediction files for SuperGLUE tasks: the leaderboard file (e.g. RTE.jsonl)."""
    path = out_dir / SUBMISSION_NAMES[task.name]
    labels = None if task.name == "copa" else list(task.labels)
    write_submission(task.name, split.examples, scores, path, labels=labels)
    return [path]
