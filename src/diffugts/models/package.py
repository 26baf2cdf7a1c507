"""Model packages: a folder (or s3:// prefix) of safetensors weights and a manifest.

``manifest.json`` says what the networks are (family, configs, scheduler, latent scale),
how studies are preprocessed, which text encoder and default prompts go with the trained
heads, where the model came from, and the sha256 of every file. Loading verifies every
checksum first and loads every network strictly: a wrong checksum, a missing file or a
key layout that does not match the configuration is an error, never a partial load.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffugts import __version__
from diffugts.errors import ConfigError, InputError
from diffugts.utils import atomic

FORMAT = "diffugts-model/1"
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelPackage:
    root: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.root.name)

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def sha256(self) -> str:
        """Identity of the whole package: the hash of its manifest (which hashes every file)."""
        return sha256_file(self.root / MANIFEST)

    def network(self, name: str) -> dict:
        nets = self.manifest.get("networks", {})
        if name not in nets:
            raise ConfigError(f"{self.root}: the model has no {name!r} network (has: {', '.join(nets) or 'none'})")
        return nets[name]

    def has(self, name: str) -> bool:
        return name in self.manifest.get("networks", {})

    def state_dict(self, name: str) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.root / self.network(name)["weights"]))


def open_package(ref: str | os.PathLike, verify: bool = True) -> ModelPackage:
    """Open a model package folder, s3:// prefix (fetched into the local cache) or the name of
    a model shipped in the library (``demo``, ``demo-2d``)."""
    from diffugts.models.defaults import resolve_model

    ref = resolve_model(os.fspath(ref))
    if ref.startswith("s3://"):
        root = _fetch(ref)
    else:
        root = Path(ref)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise InputError(ref, f"not a model package (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(manifest_path, f"unreadable manifest ({err})") from None
    if manifest.get("format") != FORMAT:
        raise InputError(manifest_path, f"unknown format {manifest.get('format')!r} (expected {FORMAT})")
    pkg = ModelPackage(root, manifest)
    if verify:
        verify_files(pkg)
    return pkg


def verify_files(pkg: ModelPackage) -> None:
    files = pkg.manifest.get("files", {})
    for name in _referenced_files(pkg.manifest):
        if name not in files:
            raise InputError(pkg.root / MANIFEST, f"{name} is used but has no checksum in the manifest")
    for name, entry in files.items():
        path = pkg.root / name
        if not path.is_file():
            raise InputError(path, "missing file listed in the model manifest")
        if path.stat().st_size != entry["bytes"]:
            raise InputError(path, f"size {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise InputError(path, f"sha256 mismatch (file {digest[:12]}..., manifest {entry['sha256'][:12]}...)")


def _referenced_files(manifest: dict) -> list[str]:
    return [n["weights"] for n in manifest.get("networks", {}).values() if n.get("weights")]


def write_package(
    root: Path, manifest: dict, weights: dict[str, dict], extra_files: Iterable[str] = ()
) -> ModelPackage:
    """Write ``weights`` (network name -> state dict) as safetensors and the manifest last.

    ``manifest["networks"][name]`` gets its ``weights`` file name; every file written (and
    every path in ``extra_files``, relative to root) is hashed into ``manifest["files"]``.
    """
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, **manifest}
    manifest.setdefault("diffugts_version", __version__)
    files = {}
    for name, state in weights.items():
        fname = f"{name}.safetensors"
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        with atomic.atomic_path(root / fname) as tmp:
            # One metadata key: safetensors writes its metadata map in hash order (safetensors
            # issue #584), so two keys would make the bytes, and the sha256, vary run to run.
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
        manifest["networks"][name]["weights"] = fname
    for fname in sorted({n["weights"] for n in manifest["networks"].values() if n.get("weights")} | set(extra_files)):
        path = root / fname
        files[fname] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest["files"] = files
    atomic.write_json(root / MANIFEST, manifest)
    return ModelPackage(root, manifest)


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFUGTS_CACHE", Path.home() / ".cache" / "diffugts"))


def _fetch(uri: str) -> Path:
    """Mirror a published package into the cache, unless the cached copy is current."""
    from diffugts.storage import MANIFEST as STORE_MANIFEST, ObjectStore, join_uri

    store = ObjectStore()
    dest = cache_dir() / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    remote = store.get_bytes(join_uri(uri, STORE_MANIFEST))
    local = dest / STORE_MANIFEST
    if not (local.is_file() and local.read_bytes() == remote):
        store.fetch_artifact(uri, dest)
    return dest


def add_networks(
    pkg: ModelPackage,
    networks: dict[str, tuple[dict, dict]],
    out: Path | None = None,
    provenance: dict | None = None,
    drop_provenance: tuple[str, ...] = (),
) -> ModelPackage:
    """A package with extra (or replaced) networks: name -> (manifest entry, state dict);
    ``provenance`` entries added or replaced, ``drop_provenance`` ones removed (records the new
    networks make untrue).

    Written into ``out`` (the other files copied) or in place; the manifest is rewritten
    last, so a reader sees either the old package or the new one.
    """
    import shutil

    root = Path(out) if out else pkg.root
    if root.resolve() != pkg.root.resolve():
        root.mkdir(parents=True, exist_ok=True)
        for name in pkg.manifest["files"]:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pkg.root / name, root / name)
    manifest = json.loads(json.dumps(pkg.manifest))  # deep copy
    manifest.pop("files", None)
    manifest.pop("format", None)
    weights = {}
    for name, (entry, state) in networks.items():
        manifest["networks"][name] = dict(entry)
        weights[name] = state
    if provenance:
        manifest.setdefault("provenance", {}).update(provenance)
    for name in drop_provenance:
        manifest.get("provenance", {}).pop(name, None)
    keep = [n["weights"] for k, n in manifest["networks"].items() if k not in weights and n.get("weights")]
    # Every other file stays hashed, safetensors included (a 2D model's text encoder), except
    # the weights of the networks being replaced.
    old = {n["weights"] for n in pkg.manifest["networks"].values() if n.get("weights")}
    extra = [f for f in pkg.manifest["files"] if f not in keep and f not in old]
    return write_package(root, manifest, weights, extra_files=keep + extra)
