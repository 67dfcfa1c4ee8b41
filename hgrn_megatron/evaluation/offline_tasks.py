"""Make harness tasks runnable without internet: their data as local JSON Lines, their YAML pointing at it.

    # on a machine with internet (the harness downloads each task's dataset once):
    python -m hgrn_megatron.evaluation.offline_tasks --tasks piqa,hellaswag,winogrande,arc_easy,arc_challenge,\
lambada_openai --out eval-tasks --cluster-dir /shared/eval-tasks
    # copy eval-tasks/ to /shared/eval-tasks on the cluster, then:
    hgrn-eval --checkpoint RUN --tasks piqa,... --task-dir /shared/eval-tasks

For each task: the harness's own YAML with its `include:` chain inlined (included text first: later keys win),
its helper code (`!function` modules) copied beside it, every split it names written to
`OUT/TASK/SPLIT.jsonl`, and a final override `dataset_path: json`, `dataset_kwargs.data_files` with the paths
under `--cluster-dir` (absolute: the harness resolves data files against the working directory).
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
_INCLUDE = re.compile(r"^include:\s*(\S+)\s*$", re.MULTILINE)


class _TagTolerantLoader(yaml.SafeLoader):
    """Reads task YAMLs for their dataset fields: `!function` and other tags become None."""


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def flattened_yaml(path: Path) -> tuple[str, list[Path]]:
    """(the YAML's text with its include chain inlined, the folders of every file in the chain)."""
    text = path.read_text()
    match = _INCLUDE.search(text)
    if not match:
        return text, [path.parent]
    included, folders = flattened_yaml(path.parent / match.group(1))
    return included + "\n" + text[: match.start()] + text[match.end():], folders + [path.parent]


def localize_task(yaml_path: Path, out_root: Path, cluster_root: str,
                  load_dataset: Callable | None = None) -> Path:
    """Write `out_root/<task>/` (YAML, helper code, split files); returns the task folder."""
    if load_dataset is None:
        import datasets

        load_dataset = datasets.load_dataset
    text, folders = flattened_yaml(Path(yaml_path))
    config = yaml.load(text, Loader=_TagTolerantLoader)  # SafeLoader plus tags read as None
    task = config["task"]
    splits = sorted({config[k] for k in SPLIT_KEYS if config.get(k)})
    data = load_dataset(config["dataset_path"], config.get("dataset_name"), **(config.get("dataset_kwargs") or {}))
    dest = Path(out_root) / task
    dest.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        for code in folder.glob("*.py"):
            shutil.copyfile(code, dest / code.name)
    for split in splits:
        data[split].to_json(str(dest / f"{split}.jsonl"))
    files = "".join(f"    {split}: {cluster_root.rstrip('/')}/{task}/{split}.jsonl\n" for split in splits)
    override = f"\n# local data (written by offline_tasks)\ndataset_path: json\ndataset_name: null\n" \
               f"dataset_kwargs:\n  data_files:\n{files}"
    (dest / f"{task}.yaml").write_text(text + override)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hgrn_megatron.evaluation.offline_tasks",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", required=True, help="comma-separated harness task names")
    p.add_argument("--out", required=True, help="folder to write (one subfolder per task)")
    p.add_argument("--cluster-dir", default=None, help="where --out will live on the offline machine "
                   "(default: --out's absolute path)")
    args = p.parse_args(argv)
    from lm_eval.tasks import TaskManager

    index = TaskManager().task_index
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    missing = [t for t in tasks if t not in index or not getattr(index[t], "yaml_path", None)]
    if missing:
        print(f"offline_tasks: error: --tasks: no task YAML for {', '.join(missing)}", file=sys.stderr)
        return 2
    cluster = args.cluster_dir or str(Path(args.out).resolve())
    for task in tasks:
        print(f"{task}: {localize_task(Path(index[task].yaml_path), Path(args.out), cluster)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
