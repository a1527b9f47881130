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
    archive="$tmp/llama_cpp_python-$VERSION.tar.gz"
    # The archive itself, found through the index's simple API (JSON form, PEP 691):
    # `pip download --no-binary :all:` would build its build dependencies (cmake among them)
    # from source just to read its metadata.
    python3 - "$VERSION" "$archive" <<'PY'
import json, shutil, sys, urllib.parse, urllib.request
version, dest = sys.argv[1], sys.argv[2]
page = "https://pypi.org/simple/llama-cpp-python/"
request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(request, timeout=60) as r:
    files = json.load(r)["files"]
name = f"llama_cpp_python-{version}.tar.gz"
url = urllib.parse.urljoin(page, next(f["url"] for f in files if f["filename"] == name))
with urllib.request.urlopen(url, timeout=300) as r, open(dest, "wb") as out:
    shutil.copyfileobj(r, out, 1 << 20)
PY
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
