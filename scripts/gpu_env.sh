# Sourced by the GPU scripts (gpu_bench.sh, gpu_study.sh). The lent GPU machine has torch, transformers, accelerate,
# pandas, pyarrow and scikit-learn, but not hydra/omegaconf/datasets/seqeval and no network: those travel as
# pure-Python copies in $CARRY/site, with the transformers wheel this project is tested with (made here by
# gpu_carry_prepare). gpu_activate puts ptv2 on the path without installing it (src/ptv2 with its config tree at
# ptv2/conf, as the wheel lays it out) and, where they are missing, the carried packages; it writes the versions and
# the device to the file it is given.
CARRY=${CARRY:-outputs/gpu_carry}
PYTHON=${PYTHON:-python3}

gpu_carry_prepare() {
    local site
    site=$($PYTHON -c "import omegaconf, pathlib; print(pathlib.Path(omegaconf.__file__).parents[1])")
    rm -rf "$CARRY" && mkdir -p "$CARRY/site" "$CARRY/wheels"
    for package in hydra omegaconf antlr4 datasets dill seqeval; do cp -r "$site/$package" "$CARRY/site/"; done
    # their metadata too: datasets asks importlib.metadata for dill's version
    for dist in hydra_core omegaconf antlr4_python3_runtime datasets dill seqeval; do
        cp -r "$site/$dist"-*.dist-info "$CARRY/site/"
    done
    find "$CARRY/site" -name __pycache__ -prune -exec rm -rf {} +
    # multiprocess has per-Python-version code: the wheel for the machine's Python (3.12), not this venv's copy.
    $PYTHON -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform any -d "$CARRY/wheels" \
        "transformers==$($PYTHON -c 'import transformers; print(transformers.__version__)')" \
        "multiprocess==$($PYTHON -c 'import importlib.metadata as m; print(m.version("multiprocess"))')"
}

gpu_activate() {
    work=$(mktemp -d)
    cp -r src/ptv2 "$work/ptv2" && rm -rf "$work/ptv2/conf" && cp -r conf "$work/ptv2/conf"
    if ! $PYTHON -c "import hydra, omegaconf, datasets, seqeval" 2>/dev/null; then
        if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
            $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
                "$CARRY"/wheels/*.whl
        fi
        export PYTHONPATH="$work/site:$(realpath "$CARRY/site")${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # The machine has no network: never wait on the hub.
    export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    $PYTHON - <<'PY' | tee "$1"
import torch, transformers
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, device: {name}")
PY
}
