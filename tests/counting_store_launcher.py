"""Run the distributed recipe (under torchrun) and record every token store this process builds.

    torchrun ... tests/counting_store_launcher.py --config dist.yaml key=value ...

``components.data.corpus.build_store`` (the name ``tokenize_windows`` calls) is wrapped: each
call that finds no store in its folder appends one JSON line (ranks, store folder) to the file
``$STORE_BUILD_LOG``. Lines are short and appended with O_APPEND, so ranks do not interleave.
"""

import json
import os
import sys
from pathlib import Path

import components.data.corpus as corpus

_build_store = corpus.build_store


def counting_build_store(documents, tokenizer, body, stride, prefix, suffix, folder, *args, **kwargs):
    built = not (Path(folder) / "meta.json").is_file()  # what build_store checks
    store = _build_store(documents, tokenizer, body, stride, prefix, suffix, folder, *args, **kwargs)
    if built:
        line = {
            "rank": int(os.environ["RANK"]),
            "node": int(os.environ["GROUP_RANK"]),
            "local_rank": int(os.environ["LOCAL_RANK"]),
            "folder": str(folder),
        }
        with open(os.environ["STORE_BUILD_LOG"], "a") as f:
            f.write(json.dumps(line) + "\n")
    return store


corpus.build_store = counting_build_store

from recipes.distill_recursive_distributed import recipe_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(recipe_main())
