"""A sharded tiny Llama and its LoRA on the local Hub: the inputs of the streamed-push tests (engine and app)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import HUB_PORT, start_hub
from tests.factories import make_adapter, make_base, make_tokenizer
from tests.hubserver import HubServer

SHARD = "20KB"  # a tiny model in many shards, so the pipeline's per-shard steps all happen


@dataclass
class Env:
    hub: HubServer
    base: Path
    adapter: Path


def upload_pair(
    hub: HubServer, base: Path, adapter_dir: Path, *, base_repo: str, adapter_repo: str, target_modules: list[str]
) -> Path:
    """A LoRA for ``base`` whose config names ``base_repo``, both uploaded; the adapter's folder."""
    make_tokenizer(base)
    adapter = make_adapter(base, adapter_dir, target_modules=target_modules)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_repo
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    for repo, folder in [(base_repo, base), (adapter_repo, adapter)]:
        hub.create_repo(repo)
        hub.upload_dir(repo, folder)
    return adapter


def sharded_env(root: Path, *, target_modules: list[str]) -> Env:
    """acme/sharded-llama and alice/sharded-lora on a Hub at HF_ENDPOINT's port (from_pretrained and the
    app read back through it); the caller stops the hub."""
    base = make_base(root / "base", "llama", max_shard_size=SHARD)
    hub = start_hub(root / "hub", port=HUB_PORT)
    adapter = upload_pair(
        hub,
        base,
        root / "adapter",
        base_repo="acme/sharded-llama",
        adapter_repo="alice/sharded-lora",
        target_modules=target_modules,
    )
    return Env(hub, base, adapter)


def model_commits(hub: HubServer, repo: str) -> list:
    """The commits of ``repo`` that carry weights (not the repo's creation)."""
    return [c for c in hub.commits(repo) if ".safetensors" in json.dumps(c)]
