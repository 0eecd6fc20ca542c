"""SuperGLUE (BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC, WSC): readers, how each task is posed, leaderboard files.

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
  branch since "Convert dataset to Parquet (#16)"), revision 3de24cf8022e94f4ee4b9d55a6f539891524d646, name = the
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

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ptv2.data.files import field, hub_rows, label_id, local_split, read_jsonl
from ptv2.errors import UserError
from ptv2.io import write_jsonl
from ptv2.metrics.superglue import record_predictions

TASKS = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")
SPLITS = ("train", "dev", "test")

# (path, revision) of the recommended parquet-backed hub copy; the config name is the task name.
HUB = ("aps/super_glue", "3de24cf8022e94f4ee4b9d55a6f539891524d646")

# Label names as task configs should list them (the hub's class order). Loading maps labels by name, so another
# order also reads right; but MultiRC/ReCoRD must be [false, true] (metrics read the "true" logit at index 1) and
# `write_submission` assumes these orders unless given `labels`. COPA has no label names: the label is the choice.
LABELS = {
    "boolq": ["false", "true"],
    "cb": ["entailment", "contradiction", "neutral"],
    "copa": ["choice1", "choice2"],
    "multirc": ["false", "true"],
    "record": ["false", "true"],
    "rte": ["entailment", "not_entailment"],
    "wic": ["false", "true"],
    "wsc": ["false", "true"],
}

# Dev metric that picks the best epoch: the official code's `test_key` ("f1" for MultiRC/ReCoRD, else accuracy;
# for CB that is accuracy, not the leaderboard's mean of accuracy and macro-F1).
SELECT_METRIC = {
    "boolq": "accuracy",
    "cb": "accuracy",
    "copa": "accuracy",
    "multirc": "f1a",
    "record": "f1",
    "rte": "accuracy",
    "wic": "accuracy",
    "wsc": "accuracy",
}

SUBMISSION_NAMES = {
    "boolq": "BoolQ.jsonl",
    "cb": "CB.jsonl",
    "copa": "COPA.jsonl",
    "multirc": "MultiRC.jsonl",
    "record": "ReCoRD.jsonl",
    "rte": "RTE.jsonl",
    "wic": "WiC.jsonl",
    "wsc": "WSC.jsonl",
}

# options.template values; the first is the default (the official `template_id` 0).
TEMPLATES = {"wic": ("question", "word_prefix"), "wsc": ("pronoun_prefix", "mark_pronoun")}

# Class names behind the hub's integer labels (ClassLabel order of the `super_glue` card), lower-cased.
_HUB_CLASSES = {
    "boolq": ("false", "true"),
    "cb": ("entailment", "contradiction", "neutral"),
    "multirc": ("false", "true"),
    "rte": ("entailment", "not_entailment"),
    "wic": ("false", "true"),
    "wsc": ("false", "true"),
}

# Columns each flat record must have (hub column names; official records are flattened to them first).
_COLUMNS = {
    "boolq": ("question", "passage"),
    "cb": ("premise", "hypothesis"),
    "copa": ("premise", "choice1", "choice2", "question"),
    "multirc": ("paragraph", "question", "answer"),
    "record": ("passage", "query"),
    "rte": ("premise", "hypothesis"),
    "wic": ("word", "sentence1", "sentence2"),
    "wsc": ("text", "span1_text", "span2_text", "span2_index"),
}


# Tasks whose official `idx` is one integer per record (MultiRC and ReCoRD nest theirs with the passage's parts).
_FLAT_IDX = ("boolq", "cb", "copa", "rte", "wic", "wsc")


# --------------------------------------------------------------------------------------------------------- loading


# The official distribution's names (format jsonl), found in task.data_dir unless task.files.<split> names another.
LOCAL_FILES = {"jsonl": {"train": ["train.jsonl"], "dev": ["val.jsonl", "dev.jsonl"], "test": ["test.jsonl"]}}


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


# ------------------------------------------------------------------------------------------ sources -> flat records
# A flat record has the hub's column names, "label" holding the official label value (str, bool or int) or None
# when unlabelled; ReCoRD has "entities" (sorted unique texts) and "answers" (sorted unique texts, None unlabelled).


def _flatten_official(name: str, record: dict, where: str, labelled: bool) -> list[tuple[str, dict]]:
    """(place, flat record) pairs of one official jsonl record: several for MultiRC and ReCoRD, else one."""
    if name == "multirc":
        return _flatten_multirc(record, where, labelled)
    if name == "record":
        return _flatten_record(record, where, labelled)
    row = dict(record)
    if name == "wsc":
        row.update(_object(record, "target", where))
    if name not in _FLAT_IDX:  # the flat tasks' records may leave it out: _examples numbers them
        row["idx"] = field(record, "idx", where)
    row["label"] = _label(record, where, labelled)
    return [(where, row)]


def _label(record: dict, where: str, labelled: bool):
    """The official label of a record; in a labelled split (train, dev) it must be given: a null label is refused
    when reading, naming the line, instead of failing mid-epoch."""
    if not labelled:
        return record.get("label")
    label = field(record, "label", where)
    if label is None:
        raise UserError(f"{where}: the label is null; train and dev files need a label on every example")
    return label


def _flatten_multirc(record: dict, where: str, labelled: bool) -> list[tuple[str, dict]]:
    passage = _object(record, "passage", where)
    paragraph = field(passage, "text", f"{where} passage")
    rows = []
    for q, question in enumerate(_objects(passage, "questions", f"{where} passage")):
        q_where = f"{where} passage.questions[{q}]"
        for a, answer in enumerate(_objects(question, "answers", q_where)):
            a_where = f"{q_where}.answers[{a}]"
            label = _label(answer, a_where, labelled)
            row = {
                "paragraph": paragraph,
                "question": field(question, "question", q_where),
                "answer": field(answer, "text", a_where),
                "idx": {
                    "paragraph": field(record, "idx", where),
                    "question": field(question, "idx", q_where),
                    "answer": field(answer, "idx", a_where),
                },
                # Official MultiRC labels are 0/1: map them to the names "false"/"true".
                "label": None if label is None else _zero_one(label, a_where) == 1,
            }
            rows.append((a_where, row))
    return rows


def _flatten_record(record: dict, where: str, labelled: bool) -> list[tuple[str, dict]]:
    passage = _object(record, "passage", where)
    text = _str(field(passage, "text", f"{where} passage"), f"{where} passage")
    entities = set()
    for e, span in enumerate(_objects(passage, "entities", f"{where} passage")):
        e_where = f"{where} passage.entities[{e}]"
        start, end = field(span, "start", e_where), field(span, "end", e_where)
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end < len(text)):
            raise UserError(f"{e_where}: entity span start={start!r} end={end!r} is outside the passage text")
        entities.add(text[start : end + 1])  # official offsets: `end` is inclusive
    rows = []
    for q, qa in enumerate(_objects(record, "qas", where)):
        q_where = f"{where} qas[{q}]"
        answers = _objects(qa, "answers", q_where) if labelled or "answers" in qa else None
        row = {
            "passage": text,
            "query": field(qa, "query", q_where),
            "entities": sorted(entities),
            "answers": sorted({field(answer, "text", q_where) for answer in answers}) if answers else None,
            "idx": {"passage": field(record, "idx", where), "query": field(qa, "idx", q_where)},
        }
        if labelled and row["answers"] is None:
            raise UserError(f"{q_where}: no answers in a labelled split")
        rows.append((q_where, row))
    return rows


def _flatten_hub(name: str, rows: Iterable[Mapping], where: str, labelled: bool) -> Iterable[tuple[str, dict]]:
    """(place, flat record) pairs of hub rows."""
    for i, row in enumerate(rows):
        place = f"{where} row {i}"
        yield place, _from_hub(name, dict(row), place, labelled)


def _from_hub(name: str, row: dict, where: str, labelled: bool) -> dict:
    """A hub row as a flat record: integer labels back to class names, -1 to None."""
    if name == "record":
        row["entities"] = sorted(set(field(row, "entities", where)))  # the hub stores a set: order is arbitrary
        row["answers"] = sorted(set(field(row, "answers", where))) or None
        if labelled and row["answers"] is None:
            raise UserError(f"{where}: no answers in a labelled split")
        return row
    label = field(row, "label", where)
    if label == -1:
        if labelled:
            raise UserError(f"{where}: label -1 (unlabelled) in a labelled split")
        row["label"] = None
    elif name in _HUB_CLASSES:
        classes = _HUB_CLASSES[name]
        if not (isinstance(label, int) and 0 <= label < len(classes)):
            raise UserError(f"{where}: unknown hub label {label!r}; expected -1 or 0..{len(classes) - 1}")
        row["label"] = classes[label]
    return row


# ------------------------------------------------------------------------------------- flat records -> canonical


def _examples(name: str, flat: Iterable[tuple[str, dict]], labels: list[str], options: Mapping) -> list[dict]:
    """Pose every flat record as the task's canonical example(s)."""
    template = _template(name, options)
    examples = []
    for position, (where, row) in enumerate(flat):
        for column in _COLUMNS[name]:
            field(row, column, where)
        if "idx" not in row and name in _FLAT_IDX:
            # A user's own file (ptv2 predict input=FILE) need not carry the official bookkeeping id: its records
            # are numbered in file order, the id the prediction file then gives back.
            row = {**row, "idx": position}
        if name == "record":
            examples.extend(_record_examples(row, labels, where))
        elif name == "copa":
            examples.append(_copa_example(row, where))
        else:
            examples.append(_pair_example(name, row, labels, template, where))
    if name in ("multirc", "record"):
        # one official record gives many examples: number them; the official ids stay in meta
        for number, example in enumerate(examples):
            example["idx"] = number
    return examples


def _template(name: str, options: Mapping) -> str | None:
    if name not in TEMPLATES:
        return None
    choices = TEMPLATES[name]
    template = str(options.get("template") or choices[0])
    if template not in choices:
        raise UserError(f"task {name}: unknown options.template '{template}'; expected one of {list(choices)}")
    return template


def _pair_example(name: str, row: dict, labels: list[str], template: str | None, where: str) -> dict:
    """The sentence-pair example of one flat record (all tasks but COPA and ReCoRD)."""
    group, meta = None, {}
    if name == "boolq":
        text_a, text_b = row["question"], row["passage"]
    elif name in ("cb", "rte"):
        text_a, text_b = row["premise"], row["hypothesis"]
    elif name == "wic":
        text_a, text_b = wic_texts(row["word"], row["sentence1"], row["sentence2"], template)
    elif name == "wsc":
        text_a, text_b = wsc_texts(row, template, where)
    else:  # multirc
        text_a, text_b = row["paragraph"], f"{row['question']} {row['answer']}"
        ids = _idx_dict(row, ("paragraph", "question", "answer"), where)
        group, meta = f"p{ids['paragraph']}-q{ids['question']}", ids
    idx = 0 if name == "multirc" else _int(field(row, "idx", where), "idx", where)
    label = -1 if row["label"] is None else label_id(row["label"], labels, where)
    return _example(idx, _str(text_a, where), _str(text_b, where), label, group or str(idx), meta)


def wic_texts(word: str, sentence1: str, sentence2: str, template: str) -> tuple[str, str]:
    """(text_a, text_b) for WiC, both templates of the official code making the target word visible.

    - "question" (official template_id 0, the RoBERTa runs): one sequence,
      "<sentence1> <sentence2> Does <word> have the same meaning in both sentences?", text_b "".
    - "word_prefix" (official template_id 1, the BERT runs): a pair, "<word>: <sentence1>" and "<word>: <sentence2>".
    """
    if template == "word_prefix":
        return f"{word}: {sentence1}", f"{word}: {sentence2}"
    return f"{sentence1} {sentence2} Does {word} have the same meaning in both sentences?", ""


def wsc_texts(row: Mapping[str, Any], template: str, where: str = "wsc") -> tuple[str, str]:
    """(text_a, text_b) for WSC: the text with the pronoun (span2) marked, and the candidate referent (span1_text).

    - "pronoun_prefix" (official template_id 0, all official runs): text_a "<span2_text>: <text>".
    - "mark_pronoun" (official template_id 1): text_a is the text split on whitespace with the word at span2_index
      wrapped in asterisks ("*he*"), joined by single spaces. Like the official code, only that one word is marked
      (span2 is a pronoun) and span1 is not marked in the text: it is text_b.
    """
    text, pronoun, referent = (_str(row[key], where) for key in ("text", "span2_text", "span1_text"))
    if template == "mark_pronoun":
        words = text.split()
        index = _int(row["span2_index"], "span2_index", where)
        if not 0 <= index < len(words):
            raise UserError(f"{where}: span2_index {index} is outside the text ({len(words)} words)")
        words[index] = f"*{words[index]}*"
        return " ".join(words), referent
    return f"{pronoun}: {text}", referent


def _copa_example(row: dict, where: str) -> dict:
    """COPA: premise with the joiner the question asks for, and the two choices."""
    question = row["question"]
    if question not in ("cause", "effect"):
        raise UserError(f"{where}: field 'question' is {question!r}; expected 'cause' or 'effect'")
    joiner = "because" if question == "cause" else "so"
    idx = _int(field(row, "idx", where), "idx", where)
    label = -1 if row["label"] is None else _zero_one(row["label"], where)
    return {
        "idx": idx,
        "text_a": f"{_str(row['premise'], where)} {joiner}",
        "choices": [_str(row["choice1"], where), _str(row["choice2"], where)],
        "label": label,
        "group": str(idx),
        "meta": "{}",
    }


def _record_examples(row: dict, labels: list[str], where: str) -> list[dict]:
    """ReCoRD: one binary example per candidate entity, all splits alike.

    As in the official dataset.py (the path its trainer uses), the candidates are the passage's unique entity texts
    (the hub's dedupe), sorted here so that both sources agree, and an entity is right when its text is one of the
    gold answer texts. The official dataset_record.py (not used by its trainer) instead samples at most 10
    candidates per gold answer for training; that is not done here.
    """
    ids = _idx_dict(row, ("passage", "query"), where)
    passage = _str(row["passage"], where).replace("@highlight\n", "- ")
    query, answers = _str(row["query"], where), row["answers"]
    group = f"p{ids['passage']}-q{ids['query']}"
    examples = []
    for entity in row["entities"]:
        label = -1 if answers is None else label_id(entity in answers, labels, where)
        meta = {**ids, "entity": entity, "answers": answers or []}
        examples.append(_example(0, passage, query.replace("@placeholder", entity), label, group, meta))
    return examples


def _example(idx: int, text_a: str, text_b: str, label: int, group: str, meta: dict) -> dict:
    return {"idx": idx, "text_a": text_a, "text_b": text_b, "label": label, "group": group, "meta": json.dumps(meta)}


def _idx_dict(row: dict, keys: tuple[str, ...], where: str) -> dict[str, int]:
    idx = field(row, "idx", where)
    if not isinstance(idx, Mapping):
        raise UserError(f"{where}: field 'idx' should be an object with {list(keys)}, got {idx!r}")
    return {key: _int(field(idx, key, f"{where} idx"), f"idx.{key}", where) for key in keys}


def _object(record: dict, name: str, where: str) -> dict:
    """record[name], checked to be a JSON object."""
    value = field(record, name, where)
    if not isinstance(value, dict):
        raise UserError(f"{where}: field '{name}' should be an object, got {type(value).__name__}")
    return value


def _objects(record: dict, name: str, where: str) -> list[dict]:
    """record[name], checked to be a list of JSON objects."""
    value = field(record, name, where)
    if not (isinstance(value, list) and all(isinstance(item, dict) for item in value)):
        raise UserError(f"{where}: field '{name}' should be a list of objects")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: expected text, got {type(value).__name__} {value!r}")
    return value


def _int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: field '{name}' should be an integer, got {value!r}")
    return value


def _zero_one(value: Any, where: str) -> int:
    """A 0/1 label (COPA's choice, MultiRC's answer label)."""
    if isinstance(value, bool) or value not in (0, 1):
        raise UserError(f"{where}: unknown label {value!r}; expected 0 or 1")
    return int(value)


# ------------------------------------------------------------------------------------------------------ submission


def write_submission(task_name: str, examples: list[dict], scores, path, labels: list[str] | None = None) -> None:
    """Write the SuperGLUE leaderboard file for one task (name it SUBMISSION_NAMES[task_name]), atomically.

    scores: (N, len(labels)) logits, or (N, 2) choice logits for COPA, in the order of `examples`.
    labels: the task's label names in logit order; defaults to LABELS[task_name].
    Label forms follow the SuperGLUE baseline's writer (jiant): RTE/CB the label names, BoolQ/WiC "true"/"false",
    WSC "True"/"False", COPA the choice 0/1; MultiRC {"idx": paragraph, "passage": {"questions": [{"idx",
    "answers": [{"idx", "label": 0|1}]}]}}; ReCoRD {"idx": query, "label": the best entity's text}.
    """
    name = task_name.lower()
    names = list(labels or LABELS[name])
    scores = np.asarray(scores)
    if scores.ndim != 2 or len(scores) != len(examples) or scores.shape[1] != len(names):
        raise ValueError(f"{name}: scores of shape {scores.shape} for {len(examples)} examples and labels {names}")
    if name == "record":
        lines = [{"idx": meta["query"], "label": entity} for entity, meta in record_predictions(examples, scores)]
    else:
        predicted = [names[i] for i in scores.argmax(axis=1)] if name != "copa" else scores.argmax(axis=1)
        if name == "multirc":
            lines = _multirc_lines(examples, predicted)
        else:
            pairs = zip(examples, predicted, strict=True)
            lines = [{"idx": example["idx"], "label": _submission_label(name, p)} for example, p in pairs]
    write_jsonl(path, lines)


def _submission_label(name: str, predicted) -> Any:
    if name == "copa":
        return int(predicted)
    if name == "wsc":
        return predicted.capitalize()  # "True" / "False"
    return predicted


def _multirc_lines(examples: list[dict], predicted: list[str]) -> list[dict]:
    """Nest MultiRC answers back under their question and paragraph, in first-seen order."""
    paragraphs: dict[int, dict[int, list]] = {}
    for example, label in zip(examples, predicted, strict=True):
        meta = json.loads(example["meta"])
        questions = paragraphs.setdefault(meta["paragraph"], {})
        questions.setdefault(meta["question"], []).append({"idx": meta["answer"], "label": int(label == "true")})
    return [
        {"idx": p, "passage": {"questions": [{"idx": q, "answers": answers} for q, answers in questions.items()]}}
        for p, questions in paragraphs.items()
    ]
