"""The per-task facts of SuperGLUE that code needs: task names, label names and orders, leaderboard file names,
templates, the hub's class order and columns, the official file names. Hub revisions and selection metrics live in
conf/task/<name>.yaml only."""

from __future__ import annotations

TASKS = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")
SPLITS = ("train", "dev", "test")

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


# The official distribution's names (format jsonl), found in task.data_dir unless task.files.<split> names another.
LOCAL_FILES = {"jsonl": {"train": ["train.jsonl"], "dev": ["val.jsonl", "dev.jsonl"], "test": ["test.jsonl"]}}
