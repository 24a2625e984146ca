#!/bin/sh
# Install the DAG into an existing Airflow: copy it, its .airflowignore rule and what it imports
# (src/sm_effdet with metric_definitions.json beside it, as in a wheel) into a dags folder, or
# into a folder to upload to Amazon MWAA's dags path (aws s3 sync FOLDER s3://BUCKET/dags/).
#   pipelines/airflow/copy-dags.sh DAGS_FOLDER
set -eu
dest=${1:?usage: pipelines/airflow/copy-dags.sh DAGS_FOLDER}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$dest"
cp "$here/dags/sm_effdet_dag.py" "$dest/"
# Appended, not replaced: the folder may have ignore rules of its own.
if ! grep -qx 'sm_effdet/' "$dest/.airflowignore" 2>/dev/null; then
    cat "$here/dags/.airflowignore" >> "$dest/.airflowignore"
fi
# Replaced whole, so that a module removed from the checkout does not linger in the copy.
rm -rf "$dest/sm_effdet"
cp -R "$root/src/sm_effdet" "$dest/sm_effdet"
cp "$root/metric_definitions.json" "$dest/sm_effdet/"
find "$dest/sm_effdet" -name __pycache__ -type d -prune -exec rm -rf {} +
echo "copied the sm-effdet DAG and src/sm_effdet into $dest"
