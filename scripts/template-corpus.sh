#!/usr/bin/env bash
# The chat-template corpus the template tests render: real templates of many model families,
# as collected in the llama-cpp-python 0.3.36 source distribution on PyPI (llama.cpp's
# models/templates, the templates named in its chat-template test, and llama-cpp-python's own).
# Fetched once into $KILN_HOME/corpora and checked against its SHA-256; prints the directory.
set -euo pipefail
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
HOME_DIR=${KILN_HOME:-$HOME/.cache/kiln}
DIR=$HOME_DIR/corpora/llama_cpp_python-$VERSION
if [ ! -f "$DIR/.complete" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "template-corpus: fetching llama-cpp-python $VERSION (source) from PyPI" >&2
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp" >&2
    archive="$tmp/llama_cpp_python-$VERSION.tar.gz"
    echo "$SHA256  $archive" | sha256sum --check --quiet - >&2 || { echo "template-corpus: checksum mismatch" >&2; exit 1; }
    mkdir -p "$DIR"
    tar xzf "$archive" -C "$tmp" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/models/templates" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/tests/test-chat-template.cpp" \
        "llama_cpp_python-$VERSION/llama_cpp/llama_chat_format.py"
    cp -r "$tmp/llama_cpp_python-$VERSION/." "$DIR/"
    touch "$DIR/.complete"
fi
echo "$DIR"
