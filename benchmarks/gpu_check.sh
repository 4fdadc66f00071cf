#!/usr/bin/env bash
# gpu_check.sh: every GPU measurement of deeplense_nb in one run, one JSON.
#
# Steps (each under `timeout`; the whole run is sized for <= 8 minutes on one H100/H200; measured on an H200, 2026-11-27):
#   simulate   benchmarks/bench_simulate.py --device cuda        simulator images/s
#   train      benchmarks/bench_train.py --sections device_path   plain fp32 file-reading loop vs ordinary Learner vs
#                                                                 device-resident path (8,192 images 1x150x150, ResNet-18)
#   demo       deeplense demo --device cuda                       simulate 37,500 + train + evaluate (goal <= 90 s), AUC; its
#                                                                 ResNet-18 (raw pixels, model_i) comes back in 15 MB parts,
#                                                                 OUT/demo_best.ckpt.part-NN, to score here on real images:
#                                                                 cat OUT/demo_best.ckpt.part-* > best.ckpt && deeplense evaluate
#                                                                 --checkpoint best.ckpt --data DIR --split all --tta --out EV
#   diffusion  benchmarks/bench_diffusion.py --device cuda        training img/s, DDIM-50 sampling img/s (goals 1,000 / 200),
#                                                                 with the full-resolution UNet and with --patch 2
#   fit        benchmarks/bench_fit.py --device cuda             smooth-lens and vortex fits/s with the sim2real settings at fit
#                                                                 batches 32 and 1024, the CPU beside it, the study's fitting time
#   sim2real   deeplense run sim2real -p device cuda              opt-in (--steps ...,sim2real): the sim-to-real study with fits and
#                                                                 training on the GPU, its wall time and results
#   pytest     pytest -m cuda                                     the CUDA-only tests
# Writes OUT/gpu_check.json (GPU name, and for every step: status ok|failed|timeout|skipped, exit code, seconds, figures),
# OUT/gpu_check.log (every step's output) and OUT/gpu_check.steps.jsonl (each step's record as soon as it ends: what is
# left if the whole run is killed). Without a GPU it runs tiny CPU versions of simulate, train and diffusion,
# skips demo and pytest -m cuda, and says so in the JSON.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--steps A,B] [--dry-run] [--python PY] [--fetch-wheels]
#     --out DIR   where gpu_check.json and gpu_check.log go (default: $OUT if set, else ./gpu_check_out)
#     --steps A,B only these steps (simulate,train,demo,diffusion,fit,sim2real,pytest); the others are "skipped" (e.g. a rerun of failed ones)
#     --dry-run   list the steps and their commands, write the JSON with every step "planned", run nothing
#     --python    the interpreter (default: $PYTHON, else python3)
#     --fetch-wheels  download (here, with network) the wheels the device machine lacks into benchmarks/wheels, then exit
#
# Dependencies: the device machine has torch, torchvision, timm, scikit-learn... but not fastcore (which the package
# imports), nbdev or papermill. Put their wheels in benchmarks/wheels/ (ignored by git: never commit wheels); the script
# installs the wheels there whose package the interpreter lacks into a private folder and puts it on PYTHONPATH
# (benchmarks/wheels/ is in .gitignore). Once, here, in the repo root (fastcore, papermill, nbformat, ipykernel and
# what they need, for CPython 3.12 x86-64):
#   bash benchmarks/gpu_check.sh --fetch-wheels
# Run it through the device tool in ONE call (about 8 minutes; the files come back under files_at):
#   run(command="bash benchmarks/gpu_check.sh --out $OUT", carry=["benchmarks/wheels"], timeout_s=580)
# Check it here first without a GPU (tiny CPU versions, about a minute):  PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --out /tmp/gc
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUTDIR="${OUT:-gpu_check_out}"; DRY=0; PY="${PYTHON:-python3}"; ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUTDIR="$2"; shift 2;;
    --steps) ONLY=",$2,"; shift 2;;
    --dry-run) DRY=1; shift;;
    --python) PY="$2"; shift 2;;
    --fetch-wheels)
      mkdir -p "$HERE/wheels"
      exec python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$HERE/wheels" fastcore papermill nbformat ipykernel;;
    -h|--help) sed -n '2,30p' "$0"; exit 0;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done
mkdir -p "$OUTDIR"; OUTDIR="$(cd "$OUTDIR" && pwd)"; export OUTDIR
LOG="$OUTDIR/gpu_check.log"; : > "$LOG"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
STEPS="$OUTDIR/gpu_check.steps.jsonl"; : > "$STEPS"
T_START=$(date +%s)

# --- environment: carried wheels, the package from this checkout -------------------------------------------------
BOOT="no wheels in benchmarks/wheels"
if ls "$HERE"/wheels/*.whl >/dev/null 2>&1 && [ $DRY -eq 0 ]; then
  NEED="$("$PY" - "$HERE"/wheels/*.whl <<'EOF'
import sys, re
from importlib import metadata
for w in sys.argv[1:]:   # only what this interpreter lacks: the image's own packages are kept
    name = re.sub(r"[-_.]+", "-", w.rsplit("/", 1)[-1].split("-")[0]).lower()
    try: metadata.version(name)
    except metadata.PackageNotFoundError: print(w)
EOF
)"
  if [ -z "$NEED" ]; then BOOT="benchmarks/wheels: every package already installed"
  elif "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" $NEED >>"$LOG" 2>&1; then
    BOOT="installed $(echo "$NEED" | wc -l) wheel(s) from benchmarks/wheels"
  else BOOT="installing benchmarks/wheels failed (see gpu_check.log)"; fi
fi
export PYTHONPATH="$REPO${WORK:+:$WORK/site}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PY
GPU="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)"
MISSING="$("$PY" - <<'EOF' 2>/dev/null
import importlib.util as u
print(" ".join(m for m in ("torch", "torchvision", "timm", "sklearn", "fastcore", "deeplense_nb", "pytest") if u.find_spec(m) is None))
EOF
)"
echo "gpu_check: python $PY, GPU '${GPU:-none}', $BOOT, missing: ${MISSING:-none}" | tee -a "$LOG"

# --- one step: name, timeout (s), skip reason ('' to run), figures extractor (python on $STEPDIR), command... -----
step() {
  local name="$1" limit="$2" skip="$3" extract="$4"; shift 4
  local dir="$WORK/$name"; mkdir -p "$dir"
  local cmd="$*"; local status rc=null secs=0
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then skip="not in --steps${ONLY%,}"; skip="${skip/--steps,/--steps }"; fi
  if [ $DRY -eq 1 ]; then status=planned; echo "== $name (timeout ${limit}s): ${skip:+skipped: $skip}${cmd}" | tee -a "$LOG"
  elif [ -n "$skip" ]; then status=skipped; echo "== $name: skipped ($skip)" | tee -a "$LOG"
  else
    echo "== $name (timeout ${limit}s): $cmd" | tee -a "$LOG"
    local t0=$(date +%s)
    (cd "$REPO" && STEPDIR="$dir" timeout -k 10 "$limit" bash -c "$cmd") >>"$LOG" 2>&1; rc=$?
    secs=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then status=ok; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; else status=failed; fi
    echo "== $name: $status (exit $rc, ${secs}s)" | tee -a "$LOG"
  fi
  STEPDIR="$dir" NAME="$name" STATUS="$status" RC="$rc" SECS="$secs" SKIP="$skip" CMD="$cmd" LIMIT="$limit" EXTRACT="$extract" \
    "$PY" - >>"$STEPS" 2>>"$LOG" <<'EOF'
import json, os
from pathlib import Path
e = os.environ; d = Path(e["STEPDIR"]); figs = None
def load(name):
    p = d / name
    return json.loads(p.read_text()) if p.is_file() else None
if e["STATUS"] not in ("planned", "skipped") and e["EXTRACT"]:
    try: figs = eval(e["EXTRACT"], {"load": load, "d": d, "json": json})
    except Exception as ex: figs = {"error": f"could not read the step's figures: {type(ex).__name__}: {ex}"}
rc = None if e["RC"] == "null" else int(e["RC"])
print(json.dumps({"name": e["NAME"], "status": e["STATUS"], "exit_code": rc, "seconds": int(e["SECS"]),
                  "timeout_s": int(e["LIMIT"]), "skipped_because": e["SKIP"] or None, "command": e["CMD"], "figures": figs}))
EOF
}

# --- the steps -----------------------------------------------------------------------------------------------------
if [ -n "$GPU" ]; then
  NOGPU=""
  step simulate 60 "" 'load("bench_simulate.json")' \
    '"$PY"' -u benchmarks/bench_simulate.py --device cuda --n 16384 --batch 2048 --n-per-image 256 --repeat 2 --n-lenstronomy 2 --out '"$STEPDIR"'
  step train 100 "" '(load("bench_train.json") or {}).get("device_path")' \
    '"$PY"' -u benchmarks/bench_train.py --sections device_path --device cuda --n 4096 --repeats 1 --out '"$STEPDIR"'
  step demo 150 "" '{"train": {k: (load("demo/train/metrics.json") or {}).get(k) for k in ("roc_auc", "train_time_s", "epochs", "device")}, "report": {k: (load("demo/report/metrics.json") or {}).get(k) for k in ("auc_macro", "accuracy", "auc_per_class")}, "goal_total_s_max": 90}' \
    '"$PY"' -u -m deeplense_nb.cli demo --device cuda --out '"$STEPDIR"'/demo '&&' \
    split -b 15m -d '"$STEPDIR"'/demo/train/best.ckpt '"$OUTDIR"'/demo_best.ckpt.part-
  step diffusion 130 "" '{**{k: (load("bench_diffusion.json") or {}).get(k) for k in ("gpu", "training", "sampling", "goals")}, "patch2": {k: (load("patch2/bench_diffusion.json") or {}).get(k) for k in ("training", "sampling", "goals")}}' \
    '"$PY"' -u benchmarks/bench_diffusion.py --device cuda --ddpm-steps 0 --train-steps 20 --repeats 1 --out '"$STEPDIR"' '&&' \
    '"$PY"' -u benchmarks/bench_diffusion.py --device cuda --ddpm-steps 0 --train-steps 20 --repeats 1 --patch 2 --out '"$STEPDIR"'/patch2
  step fit 70 "" '{k: (load("bench_fit.json") or {}).get(k) for k in ("gpu", "smooth_img_per_s", "vortex_img_per_s", "best_batch", "study_fits", "study_fit_s_estimate", "cpu_smooth_img_per_s", "cuda_over_cpu", "complete")}' \
    '"$PY"' -u benchmarks/bench_fit.py --device cuda --n 512 --batches 32,1024 --vortex-n 256 --cpu-n 8 --out '"$STEPDIR"'
  step sim2real 300 "$( [[ "$ONLY" == *",sim2real,"* ]] || echo "opt-in (about 3-5 minutes): --steps sim2real")" '{k: (load("s2r/metrics.json") or {}).get(k) for k in ("wall_time_s", "best_method", "auc_macro", "shift", "task2")}' \
    '"$PY"' -u -m deeplense_nb.cli run sim2real -p device cuda --out '"$STEPDIR"'/s2r
  step pytest 60 "$( [ -z "$MISSING" ] || echo "missing python packages: $MISSING")" '{"junit": (d / "junit.xml").is_file()}' \
    '"$PY"' -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors --junitxml '"$STEPDIR"'/junit.xml tests
else
  NOGPU="no CUDA GPU on this machine"
  step simulate 300 "" 'load("bench_simulate.json")' \
    '"$PY"' -u benchmarks/bench_simulate.py --device cpu --n 8 --n-per-image 8 --n-lenstronomy 1 --repeat 1 --train-model= --out '"$STEPDIR"'
  step train 600 "" '(load("bench_train.json") or {}).get("device_path")' \
    '"$PY"' -u benchmarks/bench_train.py --sections device_path --device cpu --n 96 --size 32 --batch 32 --repeats 1 --gpu-model resnet20 --out '"$STEPDIR"'
  step demo 1 "$NOGPU (the CPU demo takes minutes: make demo)" ''
  step diffusion 300 "" '{k: (load("bench_diffusion.json") or {}).get(k) for k in ("training", "sampling", "goals")}' \
    '"$PY"' -u benchmarks/bench_diffusion.py --device cpu --size 16 --base-width 8 --timesteps 10 --ddpm-steps 0 --ddim-steps 3 --batch 4 --train-batch 4 --train-steps 2 --repeats 1 --out '"$STEPDIR"'
  step fit 300 "" '{k: (load("bench_fit.json") or {}).get(k) for k in ("smooth_img_per_s", "vortex_img_per_s", "study_fit_s_estimate")}' \
    '"$PY"' -u benchmarks/bench_fit.py --device cpu --n 2 --vortex-n 1 --out '"$STEPDIR"'
  step sim2real 1 "$NOGPU (on a CPU: deeplense run sim2real)" ''
  step pytest 1 "$NOGPU (pytest -m cuda needs one)" ''
fi

# --- one JSON ------------------------------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - T_START ))
STEPS="$STEPS" GPU="$GPU" BOOT="$BOOT" MISSING="$MISSING" TOTAL="$TOTAL" DRY="$DRY" NOGPU="$NOGPU" OUTF="$OUTDIR/gpu_check.json" \
  "$PY" - <<'EOF'
import json, os, platform, time
e = os.environ
steps = [json.loads(l) for l in open(e["STEPS"]) if l.strip()]
try:
    import torch; tv = torch.__version__
except Exception: tv = None
res = {"gpu": e["GPU"] or None, "cuda": bool(e["GPU"]), "torch": tv, "python": platform.python_version(),
       "host": platform.node(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry_run": e["DRY"] == "1",
       "bootstrap": e["BOOT"], "missing_packages": e["MISSING"].split(), "total_seconds": int(e["TOTAL"]),
       "skipped": {s["name"]: s["skipped_because"] for s in steps if s["status"] == "skipped"},
       "note": "dry run: the steps are listed, nothing ran" if e["DRY"] == "1" else None if e["GPU"] else
               f"{e['NOGPU']}: tiny CPU versions of simulate/train/diffusion/fit ran; no GPU figures",
       "all_ok": all(s["status"] in ("ok", "skipped", "planned") for s in steps), "steps": {s["name"]: s for s in steps}}
open(e["OUTF"], "w").write(json.dumps(res, indent=2) + "\n")
print(f"gpu_check: wrote {e['OUTF']} ({len(steps)} steps, {res['total_seconds']} s, all ok: {res['all_ok']})")
EOF
rc=$?
rm -rf "$WORK"
exit $rc
