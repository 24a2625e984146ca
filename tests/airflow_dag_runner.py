"""Run in an Airflow project's Python (not pytest's): DagBag on some dags folders, then several
runs of the sm-effdet DAG with dag.test(), one process for all (Airflow takes tens of seconds
to start). `python airflow_dag_runner.py PLAN.json`; the plan:
    {"dagbags": [folder, ...], "dag_file": path, "proxy": url,
     "runs": [{"name": str, "conf": {...}, "env": {"NAME": "value" or null},
               "hold": describes of a training job the proxy answers InProgress}, ...]}
It prints `DAGBAG <folder> <json of import errors> <json of task ids>` and
`RUN <name> <state>` lines; a run's env is set (null: removed) before it starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import urllib.request
from pathlib import Path


def dagbag(folder: str) -> None:
    try:  # Airflow 3
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 2
        from airflow.models.dagbag import DagBag
    bag = DagBag(dag_folder=folder)  # examples: AIRFLOW__CORE__LOAD_EXAMPLES=false
    errors = {str(Path(k).relative_to(folder)): v.strip().splitlines()[-1]
              for k, v in bag.import_errors.items()}
    tasks = {dag_id: sorted(t.task_id for t in d.tasks) for dag_id, d in bag.dags.items()}
    print(f"DAGBAG {folder} {json.dumps(errors)} {json.dumps(tasks)}", flush=True)


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    for folder in plan.get("dagbags", []):
        dagbag(folder)
    if not plan.get("runs"):
        return
    spec = importlib.util.spec_from_file_location("sm_effdet_dag", plan["dag_file"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for run in plan["runs"]:
        for name, value in run.get("env", {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        marker = f"{plan['proxy']}/__part__/{run['name']}?hold={run.get('hold', 0)}"
        urllib.request.urlopen(marker, timeout=10).read()
        print(f"=== run {run['name']}", flush=True)
        result = module.dag_object.test(run_conf=run["conf"])
        state = str(getattr(result, "state", None)).rsplit(".", 1)[-1].lower()
        print(f"RUN {run['name']} {state}", flush=True)


if __name__ == "__main__":
    main()
