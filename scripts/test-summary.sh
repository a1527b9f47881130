#!/usr/bin/env bash
# The end of `make test`: the soak's figures (target/tmp/soak-report.txt), and how many checks
# could not run on this machine (instruction sets the CPU lacks, and the like), as the tests
# recorded them in target/tmp/kiln-skipped.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -s target/tmp/soak-report.txt ] && cat target/tmp/soak-report.txt
file=target/tmp/kiln-skipped.txt
if [ -s "$file" ]; then
    echo "skipped on this machine: $(wc -l < "$file") checks"
    sed 's/^/  /' "$file"
else
    echo "skipped on this machine: 0 checks"
fi
