#!/usr/bin/env bash
# How docs/mlflow_*.png and docs/dvc_plots.png were made: the MLflow UI in headless Chromium (Debian's
# `chromium` package), and DVC's plot specs rendered offline with vl-convert (DVC's HTML page loads Vega from a
# CDN). Run from a repository with runs in mlflow.db:  bash docs/screenshots.sh <run id> [<parent run id>]
set -euo pipefail
run=$1; parent=${2:-}
mlflow server --backend-store-uri "sqlite:///$PWD/mlflow.db" --host 127.0.0.1 --port 5055 --workers 1 &
server=$!; trap 'kill $server' EXIT
until curl -sf http://127.0.0.1:5055/health >/dev/null; do sleep 1; done
experiment=$(python -c "import mlflow; print(mlflow.MlflowClient('sqlite:///$PWD/mlflow.db').get_run('$run').info.experiment_id)")
shot() {  # twice: the first load warms the chart library
  for _ in 1 2; do chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars \
    --run-all-compositor-stages-before-draw --window-size=1500,1300 --virtual-time-budget=60000 \
    --screenshot="$1" "http://127.0.0.1:5055/#/experiments/$experiment$2?workflowType=machine_learning" 2>/dev/null; done
}
shot docs/mlflow_experiment.png ""
shot docs/mlflow_run_curves.png "/runs/$run/model-metrics"
[ -z "$parent" ] || shot docs/mlflow_run_cv.png "/runs/$parent/model-metrics"
dvc plots show --json > /tmp/busi_plots.json  # then, per vega plot: vl_convert.vegalite_to_png(spec)
python - <<'PY'
import json, vl_convert
for name, items in json.load(open("/tmp/busi_plots.json"))["data"].items():
    for item in (i for i in items if i.get("type") == "vega"):
        open(f"docs/dvc_plot_{name.replace('/', '_').replace(' ', '_')}.png", "wb").write(
            vl_convert.vegalite_to_png(item["content"], scale=1.5))
PY
