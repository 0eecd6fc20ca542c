"""Cut one official SQuAD json file into disjoint train / dev files, split by article, for small offline studies.

    python scripts/squad_split.py ../shared/data/squad_v1.1/dev-v1.1.json /tmp/squad_small --train 2000 --dev 500
    ptv2 train task=squad backbone=minilm task.data_dir=/tmp/squad_small ...

Articles are ordered by the SHA-256 of their title (a fixed shuffle: the official files group related topics),
the first ones fill the dev file and the next ones the train file, so no paragraph is in both. The last article
of each part is cut at the question that reaches the requested count. The output files are named like the
official ones (train-v1.1.json / dev-v1.1.json, or -v2.0 with --version v2.0), so `task.data_dir` can point at the
folder. Write them outside the repository: the data is not ours to commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def take(articles: list[dict], count: int) -> tuple[list[dict], list[dict], int]:
    """(articles holding the first `count` questions, the remaining articles, questions taken)."""
    taken, total = [], 0
    while articles and total < count:
        article = articles.pop(0)
        paragraphs = []
        for paragraph in article["paragraphs"]:
            qas = paragraph["qas"][: count - total]
            if qas:
                paragraphs.append({**paragraph, "qas": qas})
                total += len(qas)
        taken.append({**article, "paragraphs": paragraphs})
    return taken, articles, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="an official SQuAD json file")
    parser.add_argument("out_dir", type=Path, help="folder for the train / dev files (outside the repository)")
    parser.add_argument("--train", type=int, default=2000, help="questions in the train file")
    parser.add_argument("--dev", type=int, default=500, help="questions in the dev file")
    parser.add_argument("--version", default="v1.1", choices=["v1.1", "v2.0"], help="suffix of the file names")
    args = parser.parse_args()

    document = json.loads(args.source.read_text(encoding="utf-8"))
    articles = sorted(document["data"], key=lambda a: hashlib.sha256(a["title"].encode()).hexdigest())
    dev, rest, dev_count = take(articles, args.dev)
    train, _, train_count = take(rest, args.train)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, part, count in (("train", train, train_count), ("dev", dev, dev_count)):
        path = args.out_dir / f"{name}-{args.version}.json"
        path.write_text(json.dumps({"data": part, "version": document.get("version", "")}), encoding="utf-8")
        titles = ", ".join(a["title"] for a in part)
        print(f"{path}: {count} questions from {len(part)} articles ({titles})")


if __name__ == "__main__":
    main()
