# Sourced by the scripts here: `ensure_venv DIR` makes DIR a virtual environment with
# swinkit installed in editable mode with the [dev] extras. It is idempotent and quick
# on a second run: the install is skipped while DIR/.swinkit-installed holds the hash
# of the current pyproject.toml (written only after a successful install).

ensure_venv() {
    local venv="$1"
    local marker="$venv/.swinkit-installed"
    local want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ -x "$venv/bin/python" ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then
        return 0
    fi
    if [ ! -x "$venv/bin/python" ]; then
        echo "creating virtual environment $venv" >&2
        "${PYTHON:-python3}" -m venv "$venv"
    fi
    echo "installing swinkit into $venv" >&2
    # Exact pins: these wheels are on local disk; an unpinned torch may pull gigabytes.
    "$venv/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
    "$venv/bin/python" -m pip install -q -e '.[dev]'
    echo "$want" > "$marker"
}
