#!/usr/bin/env bash
# Misuse sweep: hostile and careless inputs given to pangu through its CLI, as a user gives them
# (damaged or crafted checkpoints, configs that do not belong to a checkpoint, foreign files,
# bad data, signals in long phases). One row per case: what was expected, the exit status, the
# time, whether a Python traceback reached the user, and pangu's last line. Takes ~2 minutes on
# the CPU after the quickstart's data exists (it prepares data_cache/tiny otherwise).
#
#   ./scripts/misuse_sweep.sh [WORK_DIR]        (default: a temporary directory, removed after)
cd "$(dirname "$0")/.."
. .venv/bin/activate
export OMP_NUM_THREADS=1
W=${1:-$(mktemp -d)}; [ -n "$1" ] || trap 'rm -rf "$W"' EXIT
mkdir -p "$W"
P=data_cache/tiny
[ -e $P/meta.json ] || pangu -q prepare --config configs/tiny.yaml > /dev/null
SMALL="data.prepared_dir=$P model.num_layers=2 model.hidden_size=64 model.num_heads=2 model.seq_length=64 train.micro_batch_size=2 train.global_batch_size=4 optim.warmup_steps=0 train.eval_interval=0 train.log_interval=1"
row() {  # name, expected, command...
  local name=$1 expect=$2; shift 2
  local t0=$(date +%s.%N)
  "$@" > $W/out 2> $W/err; local rc=$?
  local t=$(python3 -c "print(f'{$(date +%s.%N)-$t0:.1f}')")
  local tb=no; grep -q "Traceback" $W/err && tb=YES
  printf '%s | expect %s | rc %s | %ss | traceback %s | %s\n' "$name" "$expect" "$rc" "$t" "$tb" "$(grep -v '^\s*$' $W/err | tail -1 | cut -c1-230)"
}
signal_row() {  # name, seconds before the signal, signal, command...
  local name=$1 after=$2 sig=$3; shift 3
  "$@" > $W/out 2> $W/err & local pid=$!
  sleep $after; local t0=$(date +%s.%N); kill -$sig $pid; wait $pid; local rc=$?
  local t=$(python3 -c "print(f'{$(date +%s.%N)-$t0:.1f}')")
  local tb=no; grep -q "Traceback" $W/err && tb=YES
  printf '%s | rc %s | ended %ss after %s | traceback %s | %s\n' "$name" "$rc" "$t" "$sig" "$tb" "$(grep -v '^\s*$' $W/err | tail -1 | cut -c1-230)"
}
R=$W/run
pangu -q pretrain --config configs/tiny.yaml --set $SMALL train.steps=2 train.save_interval=2 train.output_dir=$R > /dev/null 2>&1 || echo "setup run failed"
C=$(ls -d $R/checkpoints/step* | tail -1)

row "resume with another model.activation" 2 pangu pretrain --config configs/tiny.yaml --set $SMALL train.steps=4 train.output_dir=$R model.activation=gelu
row "resume with another model.layernorm_eps" 2 pangu pretrain --config configs/tiny.yaml --set $SMALL train.steps=4 train.output_dir=$R model.layernorm_eps=1e-6
row "evaluate with another model.final_layernorm" 2 pangu evaluate --config configs/tiny.yaml --checkpoint $R --set $SMALL model.final_layernorm=after
cp -r $C $W/evil1; python3 - $W/evil1 <<'PY'
import json,sys; p=sys.argv[1]+"/manifest.json"; m=json.load(open(p)); k=next(iter(m["files"])); m["files"]["../../escaped"]=m["files"].pop(k); json.dump(m,open(p,"w"))
PY
row "manifest names ../../escaped: verify" 1 pangu checkpoint verify $W/evil1
cp -r $C $W/evil2; python3 - $W/evil2 <<'PY'
import json,sys; p=sys.argv[1]+"/manifest.json"; m=json.load(open(p)); m["model"]["num_heads"]=0; json.dump(m,open(p,"w"))
PY
row "manifest model num_heads 0: evaluate" 2 pangu evaluate --config configs/tiny.yaml --checkpoint $W/evil2 --set $SMALL
cp -r $C $W/evil3; python3 - $W/evil3 <<'PY'
import json,sys; p=sys.argv[1]+"/manifest.json"; m=json.load(open(p)); m["model"]["num_layers"]=100000; json.dump(m,open(p,"w"))
PY
row "manifest model num_layers 100000: generate" 2 pangu generate --checkpoint $W/evil3 --prompt x --max-new-tokens 2
R2=$W/run2; cp -r $R $R2; mkdir -p $R2/checkpoints/$(basename $C)/rng
python3 - $R2/checkpoints/$(basename $C)/rng/rank0.pt $W/pwned <<'PY'
import pickle,sys,os
class E:
    def __reduce__(self): return (os.system, (f"touch {sys.argv[2]}",))
pickle.dump(E(), open(sys.argv[1],"wb"))
PY
row "resume a checkpoint carrying a malicious rng pickle" 0 pangu -q pretrain --config configs/tiny.yaml --set $SMALL train.steps=3 train.output_dir=$R2
[ -e $W/pwned ] && echo "  !! the pickle ran" || echo "  the pickle was not run"
mkdir -p $W/foreign; echo "model: {num_layers: 99}" > $W/foreign/config.yaml
row "pretrain into a directory with a foreign config.yaml" 2 pangu pretrain --config configs/tiny.yaml --set $SMALL train.steps=2 train.output_dir=$W/foreign
mkdir -p $W/.tmp_hf; echo keep > $W/.tmp_hf/mine.txt
row "export-hf beside a user's .tmp_hf directory" 2 pangu convert export-hf $R $W/hf
[ -e $W/.tmp_hf/mine.txt ] && echo "  the user's .tmp_hf survived" || echo "  !! .tmp_hf deleted"
row "plan --gpus 1000003 (prime)" 1 timeout 60 pangu plan --config configs/200b.yaml --gpus 1000003 --gpu-memory 80GiB
row "config typo train.stepz" 2 pangu pretrain --config configs/tiny.yaml --set train.stepz=3
cp -r $P $W/p_nodocs; python3 - $W/p_nodocs/meta.json <<'PY'
import json,sys; p=sys.argv[1]; m=json.load(open(p))
def drop(o):
    if isinstance(o,dict):
        o.pop("documents",None); [drop(v) for v in o.values()]
    elif isinstance(o,list): [drop(v) for v in o]
drop(m); json.dump(m,open(p,"w"))
PY
row "meta.json without documents" 2 pangu pretrain --config configs/tiny.yaml --set $SMALL data.prepared_dir=$W/p_nodocs train.steps=2 train.output_dir=$W/r3
cp -r $P $W/p_badid; python3 - $W/p_badid <<'PY'
import sys,glob,numpy as np,json; d=sys.argv[1]
b=sorted(glob.glob(d+"/train-*.bin"))[0]; meta=json.load(open(d+"/meta.json"))
a=np.memmap(b,dtype=np.uint16,mode="r+"); a[:]=1999; a[::97]=65000; a.flush()
PY
row "prepared shard with token ids beyond the vocabulary" 2 pangu pretrain --config configs/tiny.yaml --set $SMALL data.prepared_dir=$W/p_badid train.steps=2 train.output_dir=$W/r4
printf '{"text": "ok \\ud800 lone surrogate"}\n{"text": "正常的文本。"}\n' > $W/sur.jsonl
row "jsonl with a lone surrogate (dropped, counted)" 2 pangu prepare --config configs/tiny.yaml --set "data.sources=[{kind: jsonl, path: $W/sur.jsonl}]" data.prepared_dir=$W/p_sur
signal_row "SIGTERM in validation (eval_batches 100000)" 7 TERM pangu pretrain --config configs/tiny.yaml --set $SMALL train.steps=1000 train.eval_interval=1 train.eval_batches=100000 train.output_dir=$W/r5
signal_row "SIGTERM while waiting for an absent peer" 8 TERM env RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29611 pangu pretrain --config configs/tiny.yaml --set $SMALL train.steps=2 train.output_dir=$W/r6
signal_row "Ctrl-C in prepare" 6 INT python3 -c "import signal,os,sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])" pangu prepare --config configs/tiny.yaml --set data.prepared_dir=$W/p_int
