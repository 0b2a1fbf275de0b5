#!/usr/bin/env bash
# Builds every filter crate under filters/ as a wasm32-wasip2 component and
# copies it to target/filters/<folder-name>.wasm, or, for test fixtures
# (a crate whose Cargo.toml has `[package.metadata.sluicegate] fixture =
# true`: the hostile filters, probe, ...), to target/test-filters/, so the
# demo's filter directory holds only the examples. Filters that enable the
# SDK's `callouts` feature build in a cargo invocation of their own (see
# uses_callouts below). Idempotent; safe to rerun.
#
#   scripts/build-filters.sh            # all filters
#   scripts/build-filters.sh probe auth # only these (folder names)
#
# Guests build in their own target dir (target/guest) so they never wait on
# the host's build lock. Fails if an artifact is missing or not a component.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TARGET=wasm32-wasip2
PROFILE=filter
TARGET_DIR="$ROOT/target/guest"
OUT_DIR="$ROOT/target/filters"
FIXTURE_DIR="$ROOT/target/test-filters"

if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    echo "installing rust target $TARGET"
    rustup target add "$TARGET"
fi

# Discover filters: folders under filters/ with a Cargo.toml, or those named.
folders=()
if [ "$#" -gt 0 ]; then
    for name in "$@"; do
        [ -f "filters/$name/Cargo.toml" ] || { echo "error: no filter crate filters/$name" >&2; exit 1; }
        folders+=("$name")
    done
else
    for manifest in filters/*/Cargo.toml; do
        [ -f "$manifest" ] || continue
        folders+=("$(basename "$(dirname "$manifest")")")
    done
fi
if [ "${#folders[@]}" -eq 0 ]; then
    echo "error: no filter crates under filters/" >&2
    exit 1
fi

# The package name is the first `name = "..."` of the manifest's [package].
package_name() {
    awk '
        /^\[package\]/ { in_pkg = 1; next }
        /^\[/ { in_pkg = 0 }
        in_pkg && $1 == "name" { gsub(/[" ]/, "", $0); sub(/^name=/, "", $0); print; exit }
    ' "filters/$1/Cargo.toml"
}

packages=()
for folder in "${folders[@]}"; do
    pkg="$(package_name "$folder")"
    [ -n "$pkg" ] || { echo "error: no package name in filters/$folder/Cargo.toml" >&2; exit 1; }
    packages+=("$pkg")
done

# A filter that calls out enables the SDK's `callouts` feature (world
# `callout-filter`: it imports upstream-client and exports tick-handler).
# Cargo unifies features across the packages of one invocation, so building
# it beside plain filters would give them that world too, and the host
# refuses a component importing upstream-client without a `callouts` grant.
# So the two kinds build in separate invocations.
uses_callouts() {
    grep -qE '^sluicegate-sdk-v2 *=.*features *= *\[[^]]*"callouts"' "filters/$1/Cargo.toml"
}

plain_args=()
callout_args=()
for i in "${!folders[@]}"; do
    if uses_callouts "${folders[$i]}"; then
        callout_args+=(-p "${packages[$i]}")
    else
        plain_args+=(-p "${packages[$i]}")
    fi
done

echo "building ${#packages[@]} filter(s): ${packages[*]}"
if [ "${#plain_args[@]}" -gt 0 ]; then
    cargo build --profile "$PROFILE" --target "$TARGET" --target-dir "$TARGET_DIR" "${plain_args[@]}"
fi
if [ "${#callout_args[@]}" -gt 0 ]; then
    echo "callout filters (own invocation, SDK feature \"callouts\"): ${callout_args[*]}"
    cargo build --profile "$PROFILE" --target "$TARGET" --target-dir "$TARGET_DIR" "${callout_args[@]}"
fi

mkdir -p "$OUT_DIR" "$FIXTURE_DIR"
# A component starts with "\0asm" and the component version/layer 0d 00 01 00
# (a core module has 01 00 00 00).
COMPONENT_MAGIC="0061736d0d000100"
failed=0
printf '%-24s %10s\n' "filter" "bytes"
for i in "${!folders[@]}"; do
    folder="${folders[$i]}"
    artifact="$TARGET_DIR/$TARGET/$PROFILE/${packages[$i]//-/_}.wasm"
    if [ ! -f "$artifact" ]; then
        echo "error: missing artifact $artifact (is the crate a cdylib?)" >&2
        failed=1
        continue
    fi
    magic="$(head -c 8 "$artifact" | od -An -tx1 | tr -d ' \n')"
    if [ "$magic" != "$COMPONENT_MAGIC" ]; then
        echo "error: $artifact is not a component (header $magic)" >&2
        failed=1
        continue
    fi
    dest="$OUT_DIR/$folder.wasm"
    if grep -qE '^fixture *= *true' "filters/$folder/Cargo.toml"; then
        dest="$FIXTURE_DIR/$folder.wasm"
        # A fixture left in the demo's directory by an older build goes.
        rm -f "$OUT_DIR/$folder.wasm"
    fi
    # Copy only when changed (the host watches this folder and reloads), and
    # atomically: stage next to the artifact, then rename into place.
    if ! cmp -s "$artifact" "$dest"; then
        cp "$artifact" "$artifact.staged"
        mv -f "$artifact.staged" "$dest"
    fi
    printf '%-24s %10s\n' "$folder" "$(wc -c < "$dest" | tr -d ' ')"
done
if [ "$failed" -ne 0 ]; then
    echo "error: some filters failed to build into components" >&2
    exit 1
fi
echo "components in ${OUT_DIR#"$ROOT"/}/ (test fixtures in ${FIXTURE_DIR#"$ROOT"/}/)"
