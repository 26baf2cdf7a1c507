"""Submit one run of a pipeline, by name, to Kubeflow Pipelines: `python -m pipelines.submit`.

    python -m pipelines.submit --pipeline diffugts-cohort --experiment diffugts-nightly \\
        --namespace diffugts --service-account diffugts-pipeline --run-name nightly-2026-11-26 \\
        --param studies_uri=s3://diffugts/studies/incoming/ --param 'prompts=["liver tumor"]'

Runs the newest version of the pipeline (uploading a version is all a release needs), in the
experiment named (created when missing). ``--param`` values are converted to the types the
pipeline declares (numbers, true/false, JSON lists). The KFP API is ``$KF_PIPELINES_ENDPOINT``
(else the in-cluster default); the bearer token is read from ``$KF_PIPELINES_SA_TOKEN_PATH``
when that file exists (the CronWorkflow mounts a projected service-account token there).
Prints the run id; on failure exits 1 with one line on stderr.

kfp.Client saves its context to ``~/.config/kfp/context.json`` (in-cluster, multi-user KFP:
every time, with the pod's namespace). The image's home is on a read-only root filesystem, so
when ``$HOME`` cannot be written the submitter points it at a fresh temporary folder before
importing kfp (which reads the path at import time); the CronWorkflow also sets HOME=/tmp.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

PARAMETER_TYPES = {"NUMBER_INTEGER": int, "NUMBER_DOUBLE": float}


class SubmitError(Exception):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", required=True, help="pipeline name, e.g. diffugts-cohort")
    ap.add_argument("--experiment", required=True, help="experiment name (created when missing)")
    ap.add_argument(
        "--namespace", default=None, help="the profile namespace (multi-user KFP; ignored by single-user KFP)"
    )
    ap.add_argument("--service-account", default=None, help="service account the run's pods use")
    ap.add_argument("--run-name", default=None, help="run name (default: <pipeline>-<version>)")
    ap.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="a pipeline parameter; repeatable"
    )
    args = ap.parse_args(argv)
    try:
        args.params = parse_params(args.param)
    except SubmitError as err:
        ap.error(str(err))
    return args


def parse_params(pairs: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise SubmitError(f"--param {pair!r}: expected NAME=VALUE")
        if name.strip() in params:
            raise SubmitError(f"--param {name.strip()} given twice")
        params[name.strip()] = value
    return params


def ensure_writable_home() -> str:
    """$HOME, or a new temporary folder when $HOME/.config/kfp cannot be written (a read-only
    root filesystem; os.access cannot tell, so it is tried)."""
    home = os.environ.get("HOME") or str(Path.home())
    try:
        folder = Path(home, ".config", "kfp")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError:
        home = tempfile.mkdtemp(prefix="kfp-home-")
        os.environ["HOME"] = home
    return home


def make_client():
    ensure_writable_home()  # before kfp is imported: it resolves ~ at import time
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    # kfp.Client applies the token file only in its in-cluster default; with an explicit
    # endpoint it must be passed as credentials. The namespace is passed per call (submit).
    token = os.environ.get("KF_PIPELINES_SA_TOKEN_PATH", "")
    credentials = ServiceAccountTokenVolumeCredentials(token) if token and os.path.isfile(token) else None
    return kfp.Client(credentials=credentials)


def namespace_for(client, namespace: str | None) -> str | None:
    """The namespace to send: single-user KFP rejects experiment requests that name one."""
    if not namespace:
        return None
    try:
        multi_user = client.get_kfp_healthz().multi_user
    except Exception:  # an API without the field: assume multi-user, as the namespace was given
        multi_user = True
    return namespace if multi_user is not False else None


def find_pipeline(client, name: str, namespace: str | None) -> str:
    """The pipeline's id: in the namespace first (multi-user KFP), then shared pipelines."""
    query = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    for ns in ([namespace] if namespace else []) + [None]:
        found = client.list_pipelines(filter=query, page_size=2, namespace=ns).pipelines or []
        if len(found) > 1:
            raise SubmitError(f"more than one pipeline named {name!r}")
        if found:
            return found[0].pipeline_id
    raise SubmitError(f"no pipeline named {name!r} (upload it first: docs/deployment.md)")


def newest_version(client, pipeline_id: str, name: str):
    versions = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc").pipeline_versions
    if not versions:
        raise SubmitError(f"pipeline {name!r} has no version")
    return client.get_pipeline_version(pipeline_id, versions[0].pipeline_version_id)


def declared_parameters(version) -> dict[str, str]:
    """{name: parameterType} of the version's pipeline spec ({} when it cannot be read)."""
    spec = version.pipeline_spec or {}
    spec = spec.get("pipeline_spec", spec)  # a spec with a platform spec comes wrapped
    return {
        name: p.get("parameterType", "STRING")
        for name, p in spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {}).items()
    }


def convert(params: dict[str, str], declared: dict[str, str]) -> dict:
    out = {}
    for name, value in params.items():
        kind = declared.get(name, "STRING" if not declared else None)
        if kind is None:
            raise SubmitError(f"the pipeline has no parameter {name!r} (it has: {', '.join(sorted(declared))})")
        try:
            if kind in PARAMETER_TYPES:
                out[name] = PARAMETER_TYPES[kind](value)
            elif kind == "BOOLEAN":
                if value.lower() not in ("true", "false"):
                    raise ValueError
                out[name] = value.lower() == "true"
            elif kind in ("LIST", "STRUCT"):
                out[name] = json.loads(value)
            else:
                out[name] = value
        except ValueError:
            raise SubmitError(f"--param {name}: {value!r} is not a valid {kind}") from None
    return out


def submit(client, args: argparse.Namespace):
    namespace = namespace_for(client, args.namespace)
    pipeline_id = find_pipeline(client, args.pipeline, namespace)
    version = newest_version(client, pipeline_id, args.pipeline)
    params = convert(args.params, declared_parameters(version))
    experiment = client.create_experiment(args.experiment, namespace=namespace)  # gets it when it exists
    return client.run_pipeline(
        experiment.experiment_id,
        args.run_name or version.display_name,
        params=params,
        pipeline_id=pipeline_id,
        version_id=version.pipeline_version_id,
        service_account=args.service_account,
    )


def _one_line(exc: BaseException) -> str:
    status, reason = getattr(exc, "status", None), getattr(exc, "reason", None)
    if status and reason:  # kfp_server_api ApiException: the body is a page of JSON
        return f"KFP API: {status} {reason}"
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def main(argv: list[str] | None = None, client=None) -> int:
    args = parse_args(argv)
    try:
        run = submit(client or make_client(), args)
    except Exception as exc:  # one line for the CronWorkflow's log, whatever went wrong
        print(f"submit: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(f"submitted run {run.run_id} of {args.pipeline} in experiment {args.experiment}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
