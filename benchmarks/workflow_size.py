"""How big the cohort run's Argo Workflow gets: nodes and status size, before and after batching.

    python benchmarks/workflow_size.py [--studies 100 1000 10000] [--json OUT]

On Kubeflow Pipelines v2 every run is one Argo Workflow, and Argo keeps a status entry for every
node of it in ``status.nodes`` of that one Kubernetes object. etcd refuses objects over 1.5 MiB
(its default ``--max-request-bytes``), and Argo starts compressing / offloading node status
around 1 MB; past that a run fails or slows down. This script counts the nodes and estimates
the status size for a cohort of N studies, from the pipelines' own compiled IR:

- *before*: the cohort pipeline of commit 7d8e813, a fused study pipeline per study in one
  ParallelFor (its IR is kept in benchmarks/data/diffugts-cohort-per-study.yaml);
- *after*: today's pipelines/cohort.py: batches of studies in lanes (diffugts.runners.batch).

How KFP turns IR into Argo nodes (kubeflow/pipelines, backend/src/v2/compiler/argocompiler,
dag.go and container.go; the figures are per task instance):

- container task: a driver pod, the ``system-container-executor`` DAG and its pod (3 nodes),
  plus one Argo retry node when the task has a retry policy;
- graph component / DAG task: a DAG-driver pod and the DAG node (2 nodes) plus its tasks;
- ParallelFor: the loop DAG node, an iteration-driver pod and the ``withSequence`` group node
  (3 nodes), then per item the item DAG node, its driver pod and the body's DAG node (3 nodes)
  plus the body's tasks;
- a task that runs after failures (exit handler, ``ignore_upstream_failure``) is an exit hook:
  one hook DAG node plus the task's nodes; the root adds the entrypoint, its driver and the root
  DAG (3 nodes).

Status bytes per node (Argo's NodeStatus, pkg/apis/workflow/v1alpha1/workflow_types.go, as
JSON): NODE_FIELDS_BYTES for its fixed fields with typical values (id, type, phase, template
name and scope, boundary id, start and finish times, progress, resource durations, host node),
plus its full dotted name, plus CHILD_REF_BYTES for its id in its parent's children list, plus
the input and output parameters Argo records for it, JSON-escaped (ESCAPE). Those are read from
the IR: a container driver receives the component spec, the task spec, the container spec
(with the component's source code) and the Kubernetes config, and returns the pod spec patch
(about the container spec again), which the executor DAG, its pod and the retry node receive in
turn; a DAG driver receives its component spec (all of the DAG's task specs) and its task spec.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BEFORE_IR = REPO / "benchmarks" / "data" / "diffugts-cohort-per-study.yaml"

NODE_FIELDS_BYTES = 420  # fixed NodeStatus fields with typical values (see above)
CHILD_REF_BYTES = 45  # a node id and its quotes and comma in the parent's children list
ID_PARAMS_BYTES = 120  # small parameters (parent-dag-id, iteration-index, condition, ...)
ESCAPE = 1.1  # a JSON document as a JSON string value: quotes and backslashes escaped
WORKFLOW_NAME = "diffugts-cohort-x7k2p"
GOAL_NODES, GOAL_STATUS_BYTES = 2000, 1_000_000


def _json_len(obj) -> int:
    return len(json.dumps(obj, separators=(",", ":"))) if obj is not None else 0


class Sizer:
    """Sum of nodes and status bytes of one Workflow, walking the IR the way KFP compiles it."""

    def __init__(self, spec: dict, platform: dict | None):
        self.spec = spec
        self.executors = spec["deploymentSpec"]["executors"]
        self.k8s = (
            (platform or {}).get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
        )
        self.nodes = 0.0
        self.bytes = 0.0

    def _node(self, name: str, count: float, payload: float = 0.0) -> None:
        self.nodes += count
        self.bytes += count * (NODE_FIELDS_BYTES + len(name) + CHILD_REF_BYTES + ID_PARAMS_BYTES + ESCAPE * payload)

    def root(self, counts: dict[str, float]) -> None:
        self._node(WORKFLOW_NAME, 1)
        self._node(f"{WORKFLOW_NAME}.root-driver", 1, _json_len(self.spec["root"]))
        self._node(f"{WORKFLOW_NAME}.root", 1)
        self.dag(self.spec["root"]["dag"], f"{WORKFLOW_NAME}.root", 1.0, counts)

    def dag(self, dag: dict, path: str, times: float, counts: dict[str, float]) -> None:
        for name, task in dag["tasks"].items():
            hook = task.get("triggerPolicy", {}).get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED"
            if hook:
                self._node(f"{path}.exit-hook-{name}", times)
            self.task(name, task, f"{path}.{name}", times, counts)

    def task(self, name: str, task: dict, path: str, times: float, counts: dict[str, float]) -> None:
        ref = task["componentRef"]["name"]
        component = self.spec["components"][ref]
        task_json = _json_len(task)
        if "parameterIterator" in task:
            items = counts[ref]
            self._node(path, times)
            self._node(f"{path}.iteration-driver", times, _json_len(component) + task_json)
            self._node(f"{path}.iteration-iterations", times, 0)
            self.bytes += times * items * CHILD_REF_BYTES  # the group node lists every item
            item = f"{path}.iteration-iterations(0)"
            self._node(item, times * items)
            self._node(f"{item}.iteration-item-driver", times * items, _json_len(component) + task_json)
            self._node(f"{item}.iteration-item", times * items)
            self.dag(component["dag"], f"{item}.iteration-item", times * items, counts)
        elif "dag" in component:
            self._node(f"{path}-driver", times, _json_len(component) + task_json)
            self._node(path, times)
            self.dag(component["dag"], path, times, counts)
        else:
            label = component["executorLabel"]
            container = _json_len(self.executors[label]["container"])
            k8s = _json_len(self.k8s.get(label))
            patch = container + k8s  # the pod spec patch the driver returns
            self._node(f"{path}-driver", times, _json_len(component) + task_json + container + k8s + patch)
            self._node(path, times, patch)
            self._node(f"{path}.executor", times, patch)
            if task.get("retryPolicy"):
                self._node(f"{path}.executor(0)", times, patch)


def _loop_components(spec: dict) -> list[str]:
    """Iterator components in nesting order (outermost first)."""
    found: list[str] = []

    def walk(dag: dict) -> None:
        for task in dag["tasks"].values():
            ref = task["componentRef"]["name"]
            if "parameterIterator" in task:
                found.append(ref)
            if "dag" in spec["components"][ref]:
                walk(spec["components"][ref]["dag"])

    walk(spec["root"]["dag"])
    return found


def before(studies: int) -> dict:
    doc = yaml.safe_load(BEFORE_IR.read_text())
    spec, platform = doc["pipelineSpec"], doc.get("platformSpec")
    (loop,) = _loop_components(spec)
    return _size(spec, platform, {loop: studies}, tasks=studies, batch_size=1)


def after(studies: int, batch_size: int, max_parallel: int) -> dict:
    from kfp import compiler

    from diffugts.runners.batch import plan_batches
    from pipelines.cohort import cohort_pipeline

    with _tmp() as tmp:
        path = Path(tmp, "cohort.yaml")
        compiler.Compiler().compile(cohort_pipeline, str(path))
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    spec = docs[0]
    platform = next((d for d in docs if "platforms" in d), None)
    plan = plan_batches([str(i) for i in range(studies)], batch_size, max_parallel)
    batches, lanes = len(plan["batches"]), len(plan["lanes"])
    outer, inner = _loop_components(spec)
    counts = {outer: lanes, inner: batches / lanes if lanes else 0}
    return _size(spec, platform, counts, tasks=batches, batch_size=plan["batch_size"], lanes=lanes)


def _tmp():
    import tempfile

    return tempfile.TemporaryDirectory()


def _size(spec: dict, platform: dict | None, counts: dict[str, float], **extra) -> dict:
    sizer = Sizer(spec, platform)
    sizer.root(counts)
    nodes, status = int(round(sizer.nodes)), int(round(sizer.bytes))
    return {"nodes": nodes, "status_bytes": status, "bytes_per_node": round(status / nodes), **extra}


def main(argv: list[str] | None = None) -> int:
    from diffugts.runners.batch import DEFAULT_BATCH_SIZE, DEFAULT_MAX_PARALLEL, MAX_BATCHES, MAX_PARALLEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--max-parallel", type=int, default=DEFAULT_MAX_PARALLEL)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    print(
        f"Argo Workflow of one cohort run (batch_size {args.batch_size}, max_parallel {args.max_parallel}, "
        f"at most {MAX_BATCHES} batches); goal: < {GOAL_NODES} nodes, < {GOAL_STATUS_BYTES / 1e6:.0f} MB status"
    )
    print(f"{'studies':>8} | {'layout':<28} | {'GPU tasks':>9} | {'nodes':>7} | {'status':>9} | {'B/node':>6}")
    rows = []
    for n in args.studies:
        for name, row in (
            ("before: a task per study", before(n)),
            ("after: batches in lanes", after(n, args.batch_size, args.max_parallel)),
        ):
            rows.append({"studies": n, "layout": name, **row})
            print(
                f"{n:>8} | {name:<28} | {row['tasks']:>9} | {row['nodes']:>7} | "
                f"{row['status_bytes'] / 1e6:>7.2f} MB | {row['bytes_per_node']:>6}"
            )
    # The largest Workflow the settings allow: the most studies, every lane in use.
    n = max(args.studies)
    worst = {"studies": n, "layout": f"after, max_parallel {MAX_PARALLEL}", **after(n, args.batch_size, MAX_PARALLEL)}
    rows.append(worst)
    ok = worst["nodes"] < GOAL_NODES and worst["status_bytes"] < GOAL_STATUS_BYTES
    print(
        f"largest: {n} studies, max_parallel {MAX_PARALLEL}: {worst['nodes']} nodes, "
        f"{worst['status_bytes'] / 1e6:.2f} MB: {'within' if ok else 'OVER'} the goal "
        f"({math.ceil(n / worst['tasks'])} studies per GPU task)"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
