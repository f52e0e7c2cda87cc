#!/usr/bin/env bash
# Time from `moerge contribute` on 2,000 real examples to a registered expert.
# Starts a coordinator on 127.0.0.1 in a temp dir, joins, and times one `moerge contribute`
# (train 1 epoch on MiniLM + PHATGOOSE gates + statistics + upload + validation + commit).
#   bash benchmarks/contribute_time.sh [EXAMPLES] [PORT]
set -euo pipefail
examples=${1:-2000}
port=${2:-50999}
repo=$(cd "$(dirname "$0")/.." && pwd)
py="$repo/.venv/bin/python"
moerge="$repo/.venv/bin/moerge"
work=$(mktemp -d)
trap 'kill $coordinator 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"
"$py" -c "
from moerge.datasets import load_task, write_jsonl
write_jsonl(load_task('rotten_tomatoes', max_train=$examples, seed=0).train, 'data.jsonl')"
export MOERGE_ADMIN_TOKEN=$("$py" -c "from moerge.storage.tokens import new_token; print(new_token('mga')[1])")
MOERGE_AUTO_RETRAIN=false "$moerge" coordinator serve --data-dir coord --listen "127.0.0.1:$port" \
  > coord.log 2>&1 &
coordinator=$!
until "$moerge" coordinator health --address "127.0.0.1:$port" >/dev/null 2>&1; do sleep 1; done
token=$(MOERGE_TOKEN=$MOERGE_ADMIN_TOKEN "$moerge" admin tokens create -c "127.0.0.1:$port")
export MOERGE_HOME="$work/home"
"$moerge" join -c "127.0.0.1:$port" --token "$token" --name bench >/dev/null
start=$(date +%s.%N)
"$moerge" contribute data.jsonl --task-name rotten_tomatoes --epochs 1 --json 2>/dev/null
end=$(date +%s.%N)
echo "examples=$examples contribute_to_registered_seconds=$(echo "$end - $start" | bc)"
