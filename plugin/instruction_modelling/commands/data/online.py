"""Raw records of the paper's datasets from the Hugging Face hub (``DatasetSpec.online``)."""

from __future__ import annotations

import os
from pathlib import Path

from instruction_modelling.core.read import InputError, Records, read_local

from .catalog import DatasetSpec


def is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def read_online(spec: DatasetSpec, local_path: str | Path | None = None) -> Records:
    """Download ``spec.online`` (needs network; not exercised by the offline test suite).

    * ``hub:<id>``: ``datasets.load_dataset(id, split="train")``;
    * ``hub-file:<org>/<name>/<file>``: ``huggingface_hub.hf_hub_download`` of that file, then
      read like a local file (the LESS release is one zip);
    * ``https://...``: ``datasets.load_dataset("json", data_files=url, split="train")``.
    """
    target = spec.online
    if not target:
        raise InputError(f"{spec.name}: no online source is known; pass a local file with --source")
    if is_offline():
        raise InputError(
            f"{spec.name}: no local raw file, and the machine is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
            f"set). Download it from {target} and pass --source, or put it at {local_path or spec.raw}"
        )
    if target.startswith("hub-file:"):
        from huggingface_hub import hf_hub_download

        org, name, filename = target[len("hub-file:"):].split("/", 2)
        local = hf_hub_download(f"{org}/{name}", filename, repo_type="dataset")
        return read_local(local, spec.member)
    import datasets

    if target.startswith("hub:"):
        ds = datasets.load_dataset(target[len("hub:"):], split="train")
    else:
        ds = datasets.load_dataset("json", data_files=target, split="train")
    return Records([dict(r) for r in ds], target)
