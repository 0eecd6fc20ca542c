"""Instruction -> answer pairs from JSON-lines files (the generation task type): one object per line with a prompt
field and a response field, named by task.options.prompt_field / response_field (default "prompt" / "response";
ChatGLM's AdvertiseGen example: "content" / "summary").

Examples: {"idx", "prompt", "response"}; a test file may leave the response out ("").
"""

from __future__ import annotations

from ptv2.data.files import field, local_split, read_jsonl
from ptv2.errors import UserError

LOCAL_FILES = {"jsonl": {"train": ["train.jsonl"], "dev": ["dev.jsonl", "val.jsonl"], "test": ["test.jsonl"]}}


def local_files(task) -> dict[str, dict[str, list[str]]]:
    return LOCAL_FILES


def load(task, split: str) -> list[dict]:
    if not task.get("data_dir"):
        raise UserError(f"task {task.name}: set task.data_dir=DIR, a folder with train.jsonl and dev.jsonl")
    options = task.get("options") or {}
    prompt_field, response_field = options.get("prompt_field", "prompt"), options.get("response_field", "response")
    _, path = local_split(task, split, LOCAL_FILES)
    examples = []
    for line, record in read_jsonl(path):
        where = f"{path}:{line}"
        prompt = field(record, prompt_field, where)
        response = record.get(response_field, "") if split == "test" else field(record, response_field, where)
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise UserError(f"{where}: '{prompt_field}' and '{response_field}' must be strings")
        examples.append({"idx": record.get("idx", len(examples)), "prompt": prompt, "response": response})
    return examples
