"""Model weights: identity for output rows, and a node-local copy of weights on object storage.

A model on s3:// or gs:// is copied once per node into `model.cache_dir` (files in parallel,
under a file lock so the actors of one node do not download it several times), checked against
its `weights.sha256` manifest when it has one, then loaded from local disk, where safetensors are
memory-mapped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import JobConfig, StorageConfig
from pipeline.storage import filesystem, is_remote

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _listing(uri: str, storage: StorageConfig) -> dict[str, int]:
    """Relative file name -> size under a model directory."""
    fs, root = filesystem(uri, storage)
    if not fs.isdir(root):
        raise FileNotFoundError(f"model directory {uri} does not exist")
    files = {}
    for path, info in fs.find(root, detail=True).items():
        rel = (
            posixpath.relpath(path, root.rstrip("/"))
            if is_remote(uri)
            else os.path.relpath(path, root)
        )
        files[rel] = int(info.get("size") or 0)
    return files


def model_identity(job: JobConfig) -> str:
    """`<visual name>@<hash>+<llm name>@<hash>`: the hash covers the configs and weight sizes.

    Computed on the driver from listings and the small config files, without loading weights,
    so that every output row (and the incremental-labeling key) names the exact model.
    """
    parts = []
    for uri in (job.model.visual, job.model.llm):
        fs, root = filesystem(uri, job.storage)
        h = hashlib.sha256()
        try:
            h.update(fs.cat_file(posixpath.join(root, "config.json")))
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri} has no config.json: not a model directory") from None
        for name, size in sorted(_listing(uri, job.storage).items()):
            if name.endswith(WEIGHT_SUFFIXES):
                h.update(f"{name}:{size}".encode())
        parts.append(f"{posixpath.basename(uri.rstrip('/'))}@{h.hexdigest()[:10]}")
    return "+".join(parts)


def read_visual_config(job: JobConfig) -> dict:
    fs, root = filesystem(job.model.visual, job.storage)
    return json.loads(fs.cat_file(posixpath.join(root, "config.json")))


def ensure_local(uri: str, cache_dir: str, storage: StorageConfig) -> str:
    """A local directory holding the model at `uri` (itself when it is already local)."""
    if not is_remote(uri):
        return uri
    key = hashlib.sha256(uri.encode()).hexdigest()[:12]
    target = Path(cache_dir) / f"{posixpath.basename(uri.rstrip('/'))}-{key}"
    done = target / ".complete"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; other actors wait here
        if done.exists():
            return str(target)
        listing = _listing(uri, storage)
        fs, root = filesystem(uri, storage)
        partial = Path(str(target) + ".partial")
        shutil.rmtree(partial, ignore_errors=True)

        def fetch(rel: str) -> None:
            dest = partial / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(posixpath.join(root, rel), str(dest))
            if dest.stat().st_size != listing[rel]:
                raise OSError(
                    f"{uri}/{rel}: got {dest.stat().st_size} bytes, listed {listing[rel]}"
                )

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(fetch, sorted(listing)))
        # Hash once per node, after download, against the directory's weights.sha256 (when
        # the publisher wrote one); actors then only check sizes at load time.
        # Imported here: ziya_model.loading brings torch and transformers (seconds of CPU), and
        # the driver and the feeder lanes import this module without ever loading a model.
        from ziya_model.loading import verify_weights_manifest

        verify_weights_manifest(partial, check_hash=True)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        done.write_text(json.dumps(listing))
    return str(target)


@dataclass(frozen=True)
class ModelLoader:
    """A picklable recipe that loads the model inside an actor (weights copied locally first)."""

    job: JobConfig

    def device(self) -> str:
        return "cuda" if self.job.resources.gpus_per_actor > 0 else "cpu"

    def __call__(self):
        from ziya_model import load_ziya

        visual = ensure_local(self.job.model.visual, self.job.model.cache_dir, self.job.storage)
        llm = ensure_local(self.job.model.llm, self.job.model.cache_dir, self.job.storage)
        dtype = self.job.model.dtype
        if dtype == "auto":
            dtype = "bf16" if self.device() == "cuda" else "fp32"
        # Sizes only: remote weights were hashed once when copied to this node (ensure_local),
        # and hashing 30 GB in every actor would add a minute to each start.
        device_map = self.job.model.device_map  # auto: the LLM sharded over the actor's GPUs
        return load_ziya(
            visual, llm, dtype=dtype, device=self.device(), verify="size", device_map=device_map
        )
