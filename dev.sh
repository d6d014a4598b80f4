#!/usr/bin/env bash
# Set up (once) and run the project on a fresh machine.
#   ./dev.sh demo    install, then run `ziya-batch demo` (tiny random-weight model, real photographs)
#   ./dev.sh test    install, then run the test suite
#   ./dev.sh setup   install only
# The virtual environment lives in .venv. torch is installed first and pinned to the CPU build
# these machines keep on disk; on a GPU machine install a CUDA build of torch yourself first
# (see infra/README.md) and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
    if [ ! -x .venv/bin/python ]; then
        "$PY" -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
    if ! python -c "import torch" 2>/dev/null; then
        pip install -q --upgrade pip
        pip install -q "torch==2.13.0"
    fi
    if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
        pip install -q -e ".[test]"
        touch .venv/.installed
    fi
}

# transformers 4.29.2, the version the release ran on, in an environment of its own (tokenizer
# only, ~20 s): tests/test_tokenization.py checks the prompt ids against it. Best effort: the
# test says it was skipped when this environment is missing.
setup_release_tokenizer() {
    if [ ! -f .venv-tf429/.installed ]; then
        "$PY" -m venv .venv-tf429 \
            && .venv-tf429/bin/pip install -q "transformers==4.29.2" "tokenizers==0.13.3" \
                sentencepiece protobuf \
            && touch .venv-tf429/.installed \
            || echo "transformers 4.29.2 could not be installed; its tokenization test is skipped"
    fi
    if [ -f .venv-tf429/.installed ]; then
        export ZIYA_TF429_PYTHON="$PWD/.venv-tf429/bin/python"
    fi
}

cmd=${1:-demo}
shift || true
setup
case "$cmd" in
    setup) ;;
    demo) exec ziya-batch demo "$@" ;;
    test) setup_release_tokenizer; exec python -m pytest "$@" ;;
    *) echo "usage: ./dev.sh demo|test|setup [args...]" >&2; exit 2 ;;
esac
