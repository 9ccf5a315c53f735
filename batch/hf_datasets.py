"""Hugging Face `datasets` inputs, read as the Arrow files they already are (never copied):

- a `save_to_disk` folder (input.path): a Dataset (state.json), or a DatasetDict (dataset_dict.json)
  whose split input.split names;
- a Hub dataset (input.dataset, input.config, input.split) from the local cache only
  (HF_DATASETS_CACHE, by default $HF_HOME/datasets), where `load_dataset` leaves it:
  <cache>/<org>___<name>/<config>/<version>/<hash>/<name>-<split>[-NNNNN-of-NNNNN].arrow. These
  machines are offline, and a job reads what the cache holds, not what the Hub holds today.

Both give the Arrow stream files of one split; batch.readers.open_arrow maps them.
"""

from __future__ import annotations

from pathlib import Path

from batch.errors import JobError, first_line


def is_saved_dataset(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def saved_dataset_files(path: str, split: str | None, where: str) -> list[Path]:
    """The Arrow files of a save_to_disk folder (of input.split, for a DatasetDict)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)  # maps the files; reads no rows
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise JobError(f"{where}: input.path: {path}: not a readable save_to_disk folder ({first_line(e)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[_pick_split(split, list(loaded), where, path)]
    elif split is not None:
        raise JobError(f"{where}: input.split: {path} is one dataset without splits (a saved Dataset, not a DatasetDict)")
    return [Path(f["filename"]) for f in loaded.cache_files]


def hub_dataset_files(name: str, config: str | None, split: str | None, where: str) -> list[Path]:
    """The Arrow files of a Hub dataset's split, from the local cache (never the network)."""
    import datasets
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.cache.cache import Cache

    if name.count("/") > 1 or not all(name.split("/")):
        raise JobError(f"{where}: input.dataset: {name!r} is not a dataset id (name or org/name)")
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    *org, short = name.split("/")
    root = cache / "___".join([*org, camelcase_to_snakecase(short)])
    configs = sorted({d.parts[-3] for d in root.glob("*/*/*") if d.is_dir()})
    if not configs:
        raise JobError(f"{where}: input.dataset: {name} is not in the local Hugging Face cache (HF_DATASETS_CACHE={cache})")
    if config is None and len(configs) > 1:
        raise JobError(f"{where}: input.config: required: the cache holds {name} in several configs ({', '.join(configs)})")
    if config is not None and config not in configs:
        raise JobError(f"{where}: input.config: {config!r} of {name} is not in the local Hugging Face cache; configs there: {', '.join(configs)}")
    datasets.utils.logging.set_verbosity_error()  # its "found the latest cached version" notes are no news here
    try:
        builder = Cache(cache_dir=str(cache), dataset_name=short, repo_id=name, config_name=config, version="auto", hash="auto")
        split = _pick_split(split, list(builder.info.splits or {}), where, name)
        return [Path(f["filename"]) for f in builder.as_dataset(split=split).cache_files]
    except (OSError, ValueError, KeyError) as e:
        raise JobError(f"{where}: input.dataset: {name}: its cache in {root} cannot be read ({first_line(e)})") from None


def _pick_split(split: str | None, splits: list[str], where: str, what: str) -> str:
    if split is None:
        if len(splits) == 1:
            return splits[0]
        raise JobError(f"{where}: input.split: required: {what} has the splits {', '.join(splits)}")
    if split not in splits:
        raise JobError(f"{where}: input.split: {split!r} does not exist; splits: {', '.join(splits)}")
    return split
