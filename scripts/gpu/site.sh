# Sourced by the device scripts: installs the wheels of .whl/ (scripts/gpu/wheels.sh) into a temporary site where
# pydantic is missing (the device machine has torch, transformers, pyyaml and safetensors, and no network).
if ! python3 -c "import pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
