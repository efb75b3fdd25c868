#!/usr/bin/env bash
# Builds the given targets twice, each time with empty Pants caches (local store, named caches incl.
# PEX_ROOT, workdir), and prints the sha256 of every artifact from both builds. Exits 1 when they differ.
#
#   tools/check_reproducible.sh                      # the driver and engine PEX files
#   tools/check_reproducible.sh src/driver:train     # just one target
#
# A packed-layout PEX is a directory; its digest is the sha256 over (relative path, file sha256) pairs.
# The launcher's own bootstrap (~/.cache/hermetic-es) is reused: it is pinned by hash already.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(src/driver:train src/engine:engine)
work="$(mktemp -d "${TMPDIR:-/tmp}/hermetic-es-repro.XXXXXX")"
trap 'rm -rf "${work}"' EXIT

for build in 1 2; do
  echo "::: build ${build}: ./pants package ${targets[*]} with empty caches" >&2
  start=${SECONDS}
  ./pants --no-pantsd --no-local-cache \
    --local-store-dir="${work}/store${build}" \
    --named-caches-dir="${work}/named${build}" \
    --pants-workdir="${work}/workdir${build}" \
    --pants-distdir="${work}/dist${build}" \
    package "${targets[@]}"
  echo "::: build ${build} took $((SECONDS - start)) s" >&2
  rm -rf "${work}/store${build}" "${work}/named${build}" "${work}/workdir${build}"
done

python3 - "${work}/dist1" "${work}/dist2" <<'PY'
import hashlib, sys
from pathlib import Path

def digest(path: Path) -> tuple[str, int]:
    if path.is_file():
        data = path.read_bytes()
        return hashlib.sha256(data).hexdigest(), len(data)
    outer, size = hashlib.sha256(), 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        data = f.read_bytes()
        size += len(data)
        outer.update(f"{f.relative_to(path)}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return outer.hexdigest(), size

dist1, dist2 = Path(sys.argv[1]), Path(sys.argv[2])
artifacts = sorted(p.relative_to(dist1) for p in dist1.rglob("*.pex") if not any(
    parent.suffix == ".pex" for parent in p.relative_to(dist1).parents))
same = bool(artifacts)
for rel in artifacts:
    (h1, size), (h2, _) = digest(dist1 / rel), digest(dist2 / rel) if (dist2 / rel).exists() else ("missing", 0)
    same &= h1 == h2
    print(f"{rel}  {size / 1e6:.1f} MB\n  build 1 sha256 {h1}\n  build 2 sha256 {h2}\n  {'identical' if h1 == h2 else 'DIFFERENT'}")
print("reproducible: yes" if same else "reproducible: NO")
sys.exit(0 if same else 1)
PY
