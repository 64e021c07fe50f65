#!/bin/bash
# On the GPU box: unpack the vLLM bundle, check imports, run STEPS (env,
# space separated: engine engine32 prefix bench standins pytest).  Logs under $OUT.
# PYTEST_ARGS: node ids for the pytest step (default tests/gpu_box); engine32: the
# engine check with triton 3.2 (the bundle of gpu_harness/triton_bundle.py) first on PYTHONPATH.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
STEPS=${STEPS:-engine}
python3 -c "import sys,torch,triton;print(sys.version.split()[0],torch.__version__,triton.__version__,torch.cuda.get_device_name())"
SITE=$(python3 gpu_harness/vllm_bundle.py unpack) || exit 3
export PYTHONPATH=$SITE:$PWD
python3 - <<'PY' 2>&1 | tail -40 | tee $OUT/imports.log
import importlib.metadata as m, vllm
print("vllm", vllm.__version__, m.version("vllm"), vllm.__file__)
from vllm.platforms import current_platform
print("platform", type(current_platform).__name__)
import vllm.compilation.backends, vllm.model_executor.models.llama
import vllm.v1.worker.gpu_model_runner, vllm.v1.attention.backends.triton_attn
import vllm_overlay; print("overlay", vllm_overlay.install())
PY
for step in $STEPS; do
  case $step in
    standins) timeout 120 python3 -m pytest -q -p no:cacheprovider gpu_harness/check_stand_ins_gpu.py 2>&1 | tail -15 ;;
    engine) timeout ${ENGINE_TIMEOUT:-400} python3 gpu_harness/engine_check.py $OUT/eng --tag fixed ;;
    prefix) rm -rf /tmp/prefix_repo && mkdir /tmp/prefix_repo && cp -r cpu_harness stand_ins gpu_harness tests /tmp/prefix_repo/ && \
            cp -r .gpu_bundle/prefix/vllm_overlay /tmp/prefix_repo/ && \
            (cd /tmp/prefix_repo && PYTHONPATH=$SITE:/tmp/prefix_repo timeout ${ENGINE_TIMEOUT:-400} python3 gpu_harness/engine_check.py $OUT/pre --tag prefix $PREFIX_ARGS) ;;
    engine32) python3 gpu_harness/triton_bundle.py unpack .gpu_bundle/triton-3.2.0.tar.xz --dest /tmp/triton32 && \
              PYTHONPATH=/tmp/triton32:$PYTHONPATH timeout ${ENGINE_TIMEOUT:-400} python3 gpu_harness/engine_check.py $OUT/eng32 --tag triton32 ;;
    pytest) E2E_LOG_DIR=$OUT/e2e_logs timeout ${ENGINE_TIMEOUT:-400} python3 -m pytest -v -p no:cacheprovider -rA \
              ${PYTEST_ARGS:-tests/gpu_box} 2>&1 | tail -60 | tee $OUT/pytest.log ;;
    bench) timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/e2e.py $BENCH_ARGS --out-dir $OUT/bench ;;
  esac
done
