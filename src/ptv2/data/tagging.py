"""Sequence-tagging data (NER and SRL): every supported layout becomes word-level BIO examples.

Here: the entry point (`load`), the file finding, the NER readers and the hub rows; the SRL readers are in srl.py.
The layouts differ only in how a file is cut into sentences and columns; the BIO conversion, the sentence blocks
and the canonical example they share are in bio.py.

Canonical example: ``{"idx": int, "tokens": [str], "tags": [str] (BIO), "predicate": int}``; ``predicate`` is the
0-based word index of the predicate for SRL (one example per sentence and predicate) and -1 for NER.

Local formats (``task.format``), read from ``task.data_dir``. Each split's file and its format are found by name
(``local_files``: the pack's names, ``train.txt``/``dev.txt``/``valid.txt``/``test.txt`` columns, SpERT's
``conll04_train.json`` ...) unless ``task.files.<split>`` / ``task.format`` name them:

- ``conll`` (NER): one token per line, whitespace-separated columns, token in ``options.token_column`` (default 0),
  tag in ``options.tag_column`` (default -1, the last); a blank line ends a sentence; ``-DOCSTART-`` lines are skipped.
  Tags may be IOB1, IOB2, BIOES or BILOU (``options.scheme``: auto|iob1|iob2|bio|bioes|iobes|bilou, default auto);
  all become BIO. Example: CoNLL-2003 ``token POS chunk NER``.
- ``conll`` (SRL): CoNLL-2005 / CoNLL-2012 column files. Words in ``options.word_column`` (default 0, or 3 when the
  rows look like OntoNotes ``*_gold_conll`` rows); every column written in bracket notation (``(A0*``, ``*``, ``*)``,
  ``(V*)``) that holds exactly one ``V`` span is one predicate's argument column; ``#begin``/``#end`` lines skipped.
- ``ptv2_pack``: the data pack of the official P-tuning v2 code (THUDM/P-tuning-v2 README "Data"; readers
  tasks/ner/datasets/*.py and tasks/srl/datasets/*.py at commit b1520c9aa177ffe539a77b80fd8bca992e76513e):
  CoNLL03/{train,valid,test}.txt ``token POS chunk NER`` (space-separated); CoNLL04/{train,dev,test}.txt
  space-separated, token first, tag last; ontoNotes/{train,dev,test}.sd.conllx tab-separated CoNLL-X rows with the
  token in the second column and the tag last; CoNLL05/conll05.{train,devel,test.wsj,test.brown}.txt and
  CoNLL12/conll2012.{train,devel,test}.txt with one line per (sentence, predicate):
  ``<predicate index> tok_1 ... tok_n ||| tag_1 ... tag_n`` (BIO tags, the predicate itself tagged ``B-V``).
- ``json`` (NER): CoNLL04 as distributed with SpERT: a JSON array (or JSON lines) of records with ``tokens`` and
  either ``entities`` ``[{"type", "start", "end"}]`` (``end`` exclusive) or ``tags`` (BIO or BILOU strings).

Hub (NER only, when ``task.data_dir`` is unset): ``load_hub_split(hub.path, hub.name, hub.revision, split)`` then
``convert_hub_rows``. Parquet-backed ids (the hub was unreachable when this was written, so only the conversion is
tested, on hand-written rows):

- CoNLL03: ``eriktks/conll2003``, revision ``refs/convert/parquet`` (main holds only a loading script, which
  ``datasets`` >= 4 no longer runs), name None; splits train/validation/test (14041/3250/3453); columns ``id``,
  ``tokens``, ``pos_tags``, ``chunk_tags``, ``ner_tags`` (ClassLabel ints, names in ``HUB_LABEL_NAMES``).
- OntoNotes 5.0: ``tner/ontonotes5``, revision ``refs/convert/parquet``, name None; splits train/validation/test;
  columns ``tokens``, ``tags`` (plain int32; ids from the repo's dataset/label.json, copied in ``HUB_LABEL_NAMES``).
- CoNLL04: ``DFKI-SLT/conll04``, revision ``main`` (parquet, SpERT split 922/231/288), name None; columns
  ``tokens``, ``entities`` ``[{"start", "end" (exclusive), "type"}]``, ``relations``, ``orig_id``.
Pin a full commit sha as ``hub.revision`` once it can be looked up; ``options.label_names`` overrides the id table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ptv2.data.bio import canonical_example, check_lengths, sentences, spans_to_bio, to_bio
from ptv2.data.files import field, hub_rows, local_split, read_json, read_jsonl
from ptv2.data.srl import read_srl_conll, read_srl_pack
from ptv2.errors import UserError

SRL_TASKS = ("conll05", "conll12")  # configs written before task.options.srl (is_srl)

# File names inside each folder of the official P-tuning v2 data pack (format ptv2_pack).
PACK_FILES = {
    "conll03": {"train": "train.txt", "dev": "valid.txt", "test": "test.txt"},
    "conll04": {"train": "train.txt", "dev": "dev.txt", "test": "test.txt"},
    "ontonotes": {"train": "train.sd.conllx", "dev": "dev.sd.conllx", "test": "test.sd.conllx"},
    "conll05": {
        "train": "conll05.train.txt",
        "dev": "conll05.devel.txt",
        "test": "conll05.test.wsj.txt",
        "test_brown": "conll05.test.brown.txt",
    },
    "conll12": {"train": "conll2012.train.txt", "dev": "conll2012.devel.txt", "test": "conll2012.test.txt"},
}
# Column files as commonly named (format conll): NER, and SRL in bracket notation.
NER_COLUMN_FILES = {
    "train": ["train.txt", "train.conll"],
    "dev": ["dev.txt", "valid.txt", "dev.conll"],
    "test": ["test.txt", "test.conll"],
}
CONLL03_ORIGINAL_FILES = {"train": ["eng.train"], "dev": ["eng.testa"], "test": ["eng.testb"]}  # the 2003 release
SRL_COLUMN_FILES = {
    "conll05": {
        "train": ["train.txt"],
        "dev": ["dev.txt", "devel.txt"],
        "test": ["test.txt", "test.wsj.txt"],
        "test_brown": ["test.brown.txt", "test_brown.txt"],
    },
    "conll12": {  # OntoNotes *_gold_conll files concatenated per split
        "train": ["train.txt", "train.english.v4_gold_conll", "train.gold_conll"],
        "dev": ["dev.txt", "development.english.v4_gold_conll", "development.gold_conll", "dev.gold_conll"],
        "test": ["test.txt", "test.english.v4_gold_conll", "test.gold_conll"],
    },
}


# Hub label ids -> names, for hub columns that store tag ids (the row dicts carry no names).
HUB_LABEL_NAMES = {
    "eriktks/conll2003": ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"],
    "tner/ontonotes5": [
        "O", "B-CARDINAL", "B-DATE", "I-DATE", "B-PERSON", "I-PERSON", "B-NORP", "B-GPE", "I-GPE", "B-LAW",
        "I-LAW", "B-ORG", "I-ORG", "B-PERCENT", "I-PERCENT", "B-ORDINAL", "B-MONEY", "I-MONEY", "B-WORK_OF_ART",
        "I-WORK_OF_ART", "B-FAC", "B-TIME", "I-CARDINAL", "B-LOC", "B-QUANTITY", "I-QUANTITY", "I-NORP", "I-LOC",
        "B-PRODUCT", "I-TIME", "B-EVENT", "I-EVENT", "I-FAC", "B-LANGUAGE", "I-PRODUCT", "I-ORDINAL", "I-LANGUAGE",
    ],
}  # fmt: skip
HUB_LABEL_NAMES["conll2003"] = HUB_LABEL_NAMES["eriktks/conll2003"]

DEFAULT_HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


# ---------------------------------------------------------------- entry points


def load(task: Any, split: str) -> list[dict]:
    """Examples of one split of a tagging task, from local files (``task.data_dir``) or the hub."""
    if _cfg(task, "data_dir"):
        return _load_local(task, split)
    if is_srl(task):
        raise UserError(f"task {_cfg(task, 'name')}: SRL data is read from local files only; pass task.data_dir=DIR")
    rows, where = hub_rows(task, split, "local files", DEFAULT_HUB_SPLITS)
    return convert_hub_rows(rows, _label_names(task, _cfg(task, "hub")["path"]), where=where)


def label_set(examples: list[dict]) -> list[str]:
    """Sorted unique tags of the examples with "O" first (the label ids the model is trained with)."""
    tags = {tag for example in examples for tag in example["tags"]}
    tags.discard("O")
    return ["O", *sorted(tags)]


def local_files(task: Any) -> dict[str, dict[str, list[str]]]:
    """The file names each format is found by in a data folder, {format: {split: [names]}}, preferred first (see
    ptv2.data.files.local_split). A name listed twice reads the same either way (CoNLL03/CoNLL04 pack = columns)."""
    name = _cfg(task, "name")
    pack = {split: [filename] for split, filename in PACK_FILES.get(name, {}).items()}
    if is_srl(task):
        return {"ptv2_pack": pack, "conll": SRL_COLUMN_FILES.get(name, {})}
    columns = {split: [*names, *CONLL03_ORIGINAL_FILES[split]] for split, names in NER_COLUMN_FILES.items()}
    json_files = {
        split: [f"{name}_{split}.json", f"{split}.json", f"{split}.jsonl"] for split in ("train", "dev", "test")
    }
    return {"conll": columns if name == "conll03" else NER_COLUMN_FILES, "ptv2_pack": pack, "json": json_files}


def sniff_format(path: Path) -> str | None:
    """The format a file's first line looks like: JSON, the pack's SRL lines (`... ||| ...`), else columns."""
    with open(path, encoding="utf-8") as handle:
        first = next((line.strip() for line in handle if line.strip() and not line.startswith("#")), "")
    if first.startswith(("[", "{")):
        return "json"
    return "ptv2_pack" if "|||" in first else "conll"


def _load_local(task: Any, split: str) -> list[dict]:
    name = _cfg(task, "name")
    fmt, path = local_split(task, split, local_files(task), sniff_format)
    options = _cfg(task, "options", {})
    if is_srl(task):
        if fmt == "ptv2_pack":
            return read_srl_pack(path)
        if fmt == "conll":
            return read_srl_conll(path, word_column=_cfg(options, "word_column"))
        raise UserError(f"task {name}: format '{fmt}' is not an SRL format; use conll or ptv2_pack")
    scheme = _cfg(options, "scheme", "auto")
    if fmt == "json":
        return read_conll04_json(path, scheme=scheme)
    tag_column = _cfg(options, "tag_column", -1)
    if fmt == "ptv2_pack" and name == "ontonotes":
        # The official reader splits .sd.conllx rows on tabs and takes the token from the second column.
        return read_conll_ner(path, _cfg(options, "token_column", 1), tag_column, scheme, separator="\t")
    if fmt in ("conll", "ptv2_pack"):
        return read_conll_ner(path, _cfg(options, "token_column", 0), tag_column, scheme)
    raise UserError(f"task {name}: unknown format '{fmt}'; expected conll, ptv2_pack or json")


def is_srl(task: Any) -> bool:
    """The one place that says a tagging task is semantic role labelling (its readers, its predicate segment, its
    metrics without V): `task.options.srl` as the task's YAML declares it; a config written before that option (an
    older checkpoint's) by its name."""
    options = _cfg(task, "options") or {}
    declared = _cfg(options, "srl")
    return bool(declared) if declared is not None else _cfg(task, "name") in SRL_TASKS


def _label_names(task: Any, hub_path: str) -> list[str] | None:
    names = _cfg(_cfg(task, "options", {}), "label_names")
    return list(names) if names else HUB_LABEL_NAMES.get(hub_path)


def _cfg(node: Any, key: str, default: Any = None) -> Any:
    """node[key] for a dict or OmegaConf node (missing or null -> default), so plain dicts work in tests."""
    if node is None:
        return default
    value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    return default if value is None else value


# ---------------------------------------------------------------- NER readers


def read_conll_ner(
    path: str | Path, token_column: int = 0, tag_column: int = -1, scheme: str = "auto", separator: str | None = None
) -> list[dict]:
    """NER examples from a CoNLL column file (see the module docstring); `separator` None splits on whitespace."""
    examples: list[dict] = []
    for first_line, rows in sentences(path):
        tokens, tags = [], []
        for line_number, line in rows:
            columns = line.split(separator) if separator else line.split()
            where = f"{path}:{line_number}"
            tokens.append(_column(columns, token_column, where, "token"))
            tags.append(_column(columns, tag_column, where, "tag").strip())
        tags = to_bio(tags, f"{path}:{first_line}", scheme)
        examples.append(canonical_example(len(examples), tokens, tags))
    return examples


def _column(columns: list[str], index: int, where: str, what: str) -> str:
    try:
        return columns[index]
    except IndexError:
        raise UserError(
            f"{where}: no {what} column {index} (the line has {len(columns)} columns); set task.options.{what}_column"
        ) from None


def read_conll04_json(path: str | Path, scheme: str = "auto") -> list[dict]:
    """CoNLL04 in SpERT's JSON form (array or JSON lines) of {tokens, entities|tags} records."""
    examples = []
    for where, record in _json_records(path):
        examples.append(json_example(where, record, len(examples), scheme))
    return examples


def json_example(where: str, record: dict, idx: int, scheme: str = "auto", labelled: bool = True) -> dict:
    """The canonical example of one {tokens, entities|tags} record; unlabelled (a server's request): the tags may
    be left out (all "O"), and an SRL record names its predicate word by index ("predicate")."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    tokens = _string_list(field(record, "tokens", where), where, "tokens")
    if "entities" in record:
        tags = spans_to_bio(len(tokens), _entity_spans(record["entities"], where), where)
    elif "tags" in record:
        tags = to_bio(_string_list(record["tags"], where, "tags"), where, scheme)
    elif not labelled:
        tags = ["O"] * len(tokens)
    else:
        raise UserError(f"{where}: missing field 'entities' or 'tags' (fields present: {', '.join(record)})")
    check_lengths(tokens, tags, where)
    predicate = -1 if labelled else record.get("predicate", -1)
    if isinstance(predicate, bool) or not isinstance(predicate, int) or not -1 <= predicate < len(tokens):
        raise UserError(f"{where}: 'predicate' must be the index of a word (0 to {len(tokens) - 1}), got {predicate!r}")
    return canonical_example(idx, tokens, tags, predicate)


def _json_records(path: str | Path):
    """Yield (where, record): a JSON array names records by position, JSON lines by line number."""
    with open(path, encoding="utf-8") as handle:
        starts_as_array = handle.read(4096).lstrip().startswith("[")
    if not starts_as_array:
        for line_number, record in read_jsonl(path):
            yield f"{path}:{line_number}", record
        return
    for position, record in enumerate(read_json(path)):
        where = f"{path}: record {position}"
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _entity_spans(entities: Any, where: str) -> list[tuple[int, int, str]]:
    if not isinstance(entities, list):
        raise UserError(f"{where}: 'entities' must be a list of {{type, start, end}} objects")
    spans = []
    for entity in entities:
        if not isinstance(entity, dict):
            raise UserError(f"{where}: each entity must be an object with type, start, end; got {entity!r}")
        start, end = field(entity, "start", where), field(entity, "end", where)
        if not isinstance(start, int) or not isinstance(end, int):
            raise UserError(f"{where}: entity start/end must be integers, got {start!r}, {end!r}")
        spans.append((start, end, str(field(entity, "type", where))))
    return spans


# ---------------------------------------------------------------- hub rows


def convert_hub_rows(rows: list[dict], label_names: list[str] | None = None, where: str = "hub") -> list[dict]:
    """Canonical NER examples from hub rows: tokens plus ``ner_tags``/``tags`` (ids or strings) or ``entities``.

    Tag ids are mapped through `label_names` (see ``HUB_LABEL_NAMES``); string tags are used as they are.
    """
    examples = []
    for position, row in enumerate(rows):
        row_where = f"{where} row {position}"
        tokens = _string_list(field(row, "tokens", row_where), row_where, "tokens")
        if "entities" in row and "ner_tags" not in row and "tags" not in row:
            tags = spans_to_bio(len(tokens), _entity_spans(row["entities"], row_where), row_where)
        else:
            column = "ner_tags" if "ner_tags" in row else "tags"
            raw = field(row, column, row_where)
            tags = to_bio([_tag_name(value, label_names, row_where) for value in raw], row_where)
        check_lengths(tokens, tags, row_where)
        examples.append(canonical_example(position, tokens, tags))
    return examples


def _tag_name(value: Any, label_names: list[str] | None, where: str) -> str:
    if isinstance(value, str):
        return value
    if label_names is None:
        raise UserError(f"{where}: tag ids need label names; set task.options.label_names to the id -> name list")
    if not isinstance(value, int) or not 0 <= value < len(label_names):
        raise UserError(f"{where}: tag id {value!r} is outside the {len(label_names)} label names")
    return label_names[value]


def _string_list(value: Any, where: str, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise UserError(f"{where}: '{name}' must be a list of strings")
    return list(value)
