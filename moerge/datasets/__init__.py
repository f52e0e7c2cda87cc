"""The demo's and the benchmarks' data: offline, labelled tasks built from files on disk.

Not part of training or serving: a contributor trains on its own data file, and nothing in the
coordinator or the contributor library reads these tasks. They exist so that ``moerge demo``,
the benchmarks, the examples and the tests have real, public, fixed data without a download:

* :mod:`.tasks`: the five classification tasks (BBC news, Rotten Tomatoes, fine foods, WordNet
  noun supersenses, fortunes), read from their sources;
* :mod:`.splits`: labelled examples and every task's fixed train/test split, and
  :func:`write_jsonl`;
* :mod:`.instruction_tasks`: instruction -> one-word-answer tasks for causal-LM experts
  (``moerge demo --llm``), built from the same sources;
* :mod:`.rdata`: a reader of R's data files (one task's source ships as an R package).

``scripts/fetch_data.sh`` unpacks the Debian packages some tasks need into ``data/``.
"""

from moerge.datasets.splits import Example, TaskData, write_jsonl
from moerge.datasets.tasks import (
    TASKS,
    available_tasks,
    default_data_dir,
    load_amazon_food,
    load_bbc_news,
    load_fortunes,
    load_rotten_tomatoes,
    load_task,
    load_wordnet_supersense,
)

__all__ = [
    "TASKS",
    "Example",
    "TaskData",
    "available_tasks",
    "default_data_dir",
    "load_amazon_food",
    "load_bbc_news",
    "load_fortunes",
    "load_rotten_tomatoes",
    "load_task",
    "load_wordnet_supersense",
    "write_jsonl",
]
