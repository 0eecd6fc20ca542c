"""Instruction -> answer pairs from JSON-lines files (the generation task type): one object per line with a prompt
field and a response field, named by task.options.prompt_field / response_field (default "prompt" / "response";
ChatGLM's AdvertiseGen example: "content" / "summary").

Examples: {"idx", "prompt", "response"}; a test file may leave the response out ("").
"""

from __future__ import annotations

from ptv2.data.files import JSONL_FILES, field, jsonl_records
from ptv2.errors import UserError


def local_files(task) -> dict[str, dict[str, list[str]]]:
    return JSONL_FILES


def load(task, split: str) -> list[dict]:
    return examples_of(task, jsonl_records(task, split), split)


def examples_of(task, records, split: str) -> list[dict]:
    """Canonical examples of (where, record) pairs: a file's lines, or the records a server is sent (split "test":
    the response optional)."""
    options = task.get("options") or {}
    prompt_field, response_field = options.get("prompt_field", "prompt"), options.get("response_field", "response")
    examples = []
    for where, record in records:
        prompt = field(record, prompt_field, where)
        response = record.get(response_field, "") if split == "test" else field(record, response_field, where)
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise UserError(f"{where}: '{prompt_field}' and '{response_field}' must be strings")
        examples.append({"idx": record.get("idx", len(examples)), "prompt": prompt, "response": response})
    return examples
