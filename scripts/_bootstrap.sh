# Sourced by scripts/darkroom and scripts/test: create .venv and install darkroom with the
# extras asked for, again only when pyproject.toml or the extras changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
fi
spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
stamp="$venv/.darkroom-installed-${extras:-core}"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "setting up $venv (${extras:-core}) ..." >&2
    "$venv/bin/python" -m pip install -q -e "$spec" >&2
    echo "$want" > "$stamp"
fi
