# Sourced by the one-call GPU scripts: install the wheels carried in .whl/ (packages the GPU image
# lacks: see docs/benchmarks.md) into /tmp/site and put them and the repo on PYTHONPATH.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
