#!/usr/bin/env bash
# Builds the given targets twice, each time with empty Pants caches (local store, named caches incl.
# PEX_ROOT, workdir), and prints the sha256 of every artifact from both builds. Exits 1 when they differ.
#
#   tools/check_reproducible.sh                      # the driver and engine PEX files
#   tools/check_reproducible.sh src/driver:train     # just one target
#   tools/check_reproducible.sh --manifest dist/bundle/bundle-manifest.json
#       one build of the bundle's PEX files with empty caches, each file compared with the sha256 the
#       release bundle's manifest lists (the bundle was built on another machine or at another time)
#
# A packed-layout PEX is a directory; its digest is the sha256 over (relative path, file sha256) pairs.
# Each build is hashed and deleted before the next starts, so the disk holds one cold build at a time
# (about 25 GB for the engine PEX). The launcher's own bootstrap (~/.cache/hermetic-es) is reused: it is
# pinned by hash already.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
manifest=""
if [[ "${1:-}" == "--manifest" ]]; then
  manifest="$(realpath "$2")"
  shift 2
fi
targets=("$@")
if [[ -n "${manifest}" ]]; then
  # The bundle's artifacts (see src/release/bundle.py, ARTIFACTS).
  targets=(src/driver:train src/release:prepare-engine src/engine:engine)
fi
[[ ${#targets[@]} -gt 0 ]] || targets=(src/driver:train src/engine:engine)
builds=(1 2)
[[ -z "${manifest}" ]] || builds=(1)
work="$(mktemp -d "${TMPDIR:-/tmp}/hermetic-es-repro.XXXXXX")"
dist="dist/reproducibility-check"  # Pants wants the dist dir inside the build root
trap 'rm -rf "${work}" "${dist}"' EXIT

digest_dist() {
  python3 - "$1" <<'PY'
import hashlib, json, sys
from pathlib import Path

dist = Path(sys.argv[1])


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


artifacts = [p for p in dist.rglob("*.pex") if not any(q.suffix == ".pex" for q in p.relative_to(dist).parents)]
print(json.dumps({str(p.relative_to(dist)): digest(p) for p in sorted(artifacts)}))
PY
}

for build in "${builds[@]}"; do
  echo "::: build ${build}: ./pants package ${targets[*]} with empty caches" >&2
  start=${SECONDS}
  ./pants --no-pantsd --no-local-cache \
    --local-store-dir="${work}/store" \
    --named-caches-dir="${work}/named" \
    --pants-workdir="${work}/workdir" \
    --pants-distdir="${dist}" \
    package "${targets[@]}"
  echo "::: build ${build} took $((SECONDS - start)) s" >&2
  digest_dist "${dist}" > "${work}/digests${build}.json"
  if [[ -n "${manifest}" ]]; then
    python3 - "${dist}" "${manifest}" <<'PY'
import hashlib, json, sys
from pathlib import Path

dist, manifest = Path(sys.argv[1]), json.load(open(sys.argv[2]))
built = {"train.pex": "src.driver/train.pex", "prepare-engine.pex": "src.release/prepare-engine.pex",
         "engine.pex": "src.engine/engine.pex"}
differences = 0
for name, rel in built.items():
    listed = {k: v for k, v in manifest["files"].items() if k == name or k.startswith(name + "/")}
    root = dist / rel
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    got = {}
    for f in files:
        key = name if f == root else f"{name}/{f.relative_to(root).as_posix()}"
        got[key] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size}
    bad = sorted(k for k in listed.keys() | got.keys() if listed.get(k) != got.get(k))
    differences += len(bad)
    print(f"{name}: {len(got)} files, " + ("identical to the manifest" if not bad else f"{len(bad)} DIFFER: {bad[:5]}"))
print(f"bundle {manifest['id']}: " + ("reproduced: yes" if not differences else "reproduced: NO"))
sys.exit(1 if differences else 0)
PY
    exit $?
  fi
  rm -rf "${work}/store" "${work}/named" "${work}/workdir" "${dist}"
done

python3 - "${work}/digests1.json" "${work}/digests2.json" <<'PY'
import json, sys

first, second = (json.load(open(p)) for p in sys.argv[1:3])
same = bool(first) and first.keys() == second.keys()
for name in sorted(first.keys() | second.keys()):
    (h1, size), (h2, _) = first.get(name, ("missing", 0)), second.get(name, ("missing", 0))
    same &= h1 == h2
    verdict = "identical" if h1 == h2 else "DIFFERENT"
    print(f"{name}  {size / 1e6:.1f} MB\n  build 1 sha256 {h1}\n  build 2 sha256 {h2}\n  {verdict}")
print("reproducible: yes" if same else "reproducible: NO")
sys.exit(0 if same else 1)
PY
