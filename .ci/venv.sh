# Sourced by the test-dependency scripts: `ensure_venv_packages TAG 'import a, b' spec...`
# creates $REPO/.venv if absent, then pip-installs the specs unless the import already works.
# Idempotent; needs PyPI only when something is missing. Expects REPO to be set.
ensure_venv_packages() {
    local tag="$1" probe="$2"
    shift 2
    local venv="$REPO/.venv"
    if [ ! -x "$venv/bin/python" ]; then
        echo "$tag: creating venv at $venv"
        "${PYTHON:-python3}" -m venv "$venv"
    fi
    if ! "$venv/bin/python" -c "$probe" >/dev/null 2>&1; then
        echo "$tag: installing $* into $venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
    fi
}
