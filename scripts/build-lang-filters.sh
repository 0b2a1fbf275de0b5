#!/usr/bin/env bash
# Builds the filters written in Python, JavaScript and C into components in
# target/filters/<folder>.wasm, installing each toolchain by itself the first
# time (pinned versions, cached in $SLUICEGATE_TOOLS, default
# ~/.cache/sluicegate/lang-tools, so later runs skip the installs):
#
#   Python      componentize-py 0.25.1 (PyPI, in a venv)
#   JavaScript  @bytecodealliance/componentize-js 0.23.0 (npm, a local folder)
#   C           Debian clang-19 + lld-19 + wasi-libc + libclang-rt-19-dev-wasm32,
#               wit-bindgen-cli 0.63.0 and wasm-tools 1.262.0 (crates.io, cargo
#               install --locked), the WASI preview1 adapter from the crate
#               wasi-preview1-component-adapter-provider 48.0.8
#
# A folder's language is told by its entry file: app.py (Python), filter.js
# (JavaScript), filter.c (C; every *.c of the folder is compiled). Its
# contract is 0.1's world `filter` (wit/) unless the folder has a WORLD file
# naming a WIT folder under wit/ and a world, e.g. `v0.2 callout-filter`
# (filters/py-quota): componentize-py and componentize-js import the whole
# world they are given, so a callout world means a `callouts` grant.
#
#   scripts/build-lang-filters.sh                    # every such folder under filters/
#   scripts/build-lang-filters.sh py-router          # only these (folder names under filters/)
#   scripts/build-lang-filters.sh --templates        # also guest-sdk/templates/* -> target/lang-templates/
#   scripts/build-lang-filters.sh --out DIR PATH...  # any folders, into DIR
#
# A filter is rebuilt only when its sources, the WIT, the build commands or
# the toolchain pins change: built components are also kept in $SLUICEGATE_TOOLS/built
# under that stamp, so a fresh clone on the same machine reuses them. Fails
# if an artifact is not a component.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY_VERSION="0.25.1"
JS_VERSION="0.23.0"
WIT_BINDGEN_VERSION="0.63.0"
WASM_TOOLS_VERSION="1.262.0"
ADAPTER_VERSION="48.0.8"
CLANG="clang-19"

TOOLS="${SLUICEGATE_TOOLS:-$HOME/.cache/sluicegate/lang-tools}"
BUILD="$ROOT/target/lang-build"
OUT_DIR="$ROOT/target/filters"
WIT_ROOT="$ROOT/wit"
# The WIT folder and world of the folder being built (see world_of).
WIT="$WIT_ROOT"
WORLD="filter"

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- arguments
templates=0
dirs=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --templates) templates=1 ;;
        --out) shift; OUT_DIR="$(mkdir -p "$1" && cd "$1" && pwd)" ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        *)
            if [ -d "$1" ]; then dirs+=("$(cd "$1" && pwd)")
            elif [ -d "filters/$1" ]; then dirs+=("$ROOT/filters/$1")
            else die "no filter folder $1"
            fi ;;
    esac
    shift
done
lang_of() {
    if [ -f "$1/Cargo.toml" ]; then echo rust
    elif [ -f "$1/app.py" ]; then echo python
    elif [ -f "$1/filter.js" ]; then echo javascript
    elif [ -f "$1/filter.c" ]; then echo c
    else echo none
    fi
}
if [ "${#dirs[@]}" -eq 0 ]; then
    for d in "$ROOT"/filters/*/; do
        d="${d%/}"
        case "$(lang_of "$d")" in python|javascript|c) dirs+=("$d") ;; esac
    done
fi
template_dirs=()
if [ "$templates" -eq 1 ]; then
    for d in "$ROOT"/guest-sdk/templates/*/; do template_dirs+=("${d%/}"); done
fi

# Sets WIT and WORLD for folder $1: its WORLD file (`<dir under wit/> <world>`),
# else 0.1's `filter`.
world_of() {
    WIT="$WIT_ROOT"; WORLD="filter"
    [ -f "$1/WORLD" ] || return 0
    local sub world
    read -r sub world < "$1/WORLD" || true
    [ -n "$sub" ] && [ -n "$world" ] || die "$1/WORLD: expected '<dir under wit/> <world>', e.g. 'v0.2 callout-filter'"
    [ -d "$WIT_ROOT/$sub" ] || die "$1/WORLD: no WIT folder wit/$sub"
    WIT="$(cd "$WIT_ROOT/$sub" && pwd)"
    WORLD="$world"
}

need_python=0; need_js=0; need_c=0
for d in "${dirs[@]}" "${template_dirs[@]}"; do
    case "$(lang_of "$d")" in
        python) need_python=1 ;;
        javascript) need_js=1 ;;
        c) need_c=1 ;;
        *) die "$d: no app.py, filter.js or filter.c" ;;
    esac
done

mkdir -p "$TOOLS" "$BUILD" "$OUT_DIR"

# ---------------------------------------------------------------- toolchains
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root for: $*"
    fi
}

COMPONENTIZE_PY="$TOOLS/py/bin/componentize-py"
install_python() {
    if [ -x "$COMPONENTIZE_PY" ] && [ "$("$COMPONENTIZE_PY" --version 2>/dev/null)" = "componentize-py $PY_VERSION" ]; then
        return
    fi
    local t; t="$(now)"
    log "installing componentize-py $PY_VERSION (PyPI) into $TOOLS/py"
    if ! python3 -m venv "$TOOLS/py" >&2; then
        # Debian's python3 ships venv separately.
        rm -rf "$TOOLS/py"
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-venv >&2 \
            || { as_root apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-venv >&2; }
        python3 -m venv "$TOOLS/py"
    fi
    "$TOOLS/py/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$PY_VERSION"
    log "  done in $(secs "$t") s"
}

COMPONENTIZE_JS="$TOOLS/js/node_modules/.bin/componentize-js"
install_js() {
    local pkg="$TOOLS/js/node_modules/@bytecodealliance/componentize-js/package.json"
    if [ -x "$COMPONENTIZE_JS" ] && grep -q "\"version\": \"$JS_VERSION\"" "$pkg" 2>/dev/null; then
        return
    fi
    local t; t="$(now)"
    log "installing @bytecodealliance/componentize-js $JS_VERSION (npm) into $TOOLS/js"
    mkdir -p "$TOOLS/js"
    [ -f "$TOOLS/js/package.json" ] || echo '{ "private": true }' > "$TOOLS/js/package.json"
    npm install --prefix "$TOOLS/js" --no-audit --no-fund --loglevel=error \
        "@bytecodealliance/componentize-js@$JS_VERSION" >&2
    log "  done in $(secs "$t") s"
}

WIT_BINDGEN="$TOOLS/cargo/bin/wit-bindgen"
WASM_TOOLS="$TOOLS/cargo/bin/wasm-tools"
ADAPTER="$TOOLS/wasi_snapshot_preview1.reactor-$ADAPTER_VERSION.wasm"
install_c() {
    local t
    if ! command -v "$CLANG" >/dev/null || ! command -v wasm-ld-19 >/dev/null \
        || [ ! -f /usr/lib/wasm32-wasi/libc.a ] \
        || ! ls /usr/lib/llvm-19/lib/clang/19/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1; then
        t="$(now)"
        log "installing clang-19, lld-19, wasi-libc, libclang-rt-19-dev-wasm32 (Debian)"
        as_root apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
            clang-19 lld-19 wasi-libc libclang-rt-19-dev-wasm32 >&2
        log "  done in $(secs "$t") s"
    fi
    # Both tools share one build dir, so their common crates compile once.
    if [ ! -x "$WIT_BINDGEN" ] || [ "$("$WIT_BINDGEN" --version 2>/dev/null | awk '{print $2}')" != "$WIT_BINDGEN_VERSION" ]; then
        t="$(now)"
        log "installing wit-bindgen-cli $WIT_BINDGEN_VERSION (crates.io, C generator only)"
        cargo install --locked --quiet --root "$TOOLS/cargo" --target-dir "$TOOLS/cargo-build" \
            --no-default-features --features c "wit-bindgen-cli@$WIT_BINDGEN_VERSION" >&2
        log "  done in $(secs "$t") s"
    fi
    if [ ! -x "$WASM_TOOLS" ] || [ "$("$WASM_TOOLS" --version 2>/dev/null | awk '{print $2}')" != "$WASM_TOOLS_VERSION" ]; then
        t="$(now)"
        log "installing wasm-tools $WASM_TOOLS_VERSION (crates.io, component commands only)"
        cargo install --locked --quiet --root "$TOOLS/cargo" --target-dir "$TOOLS/cargo-build" \
            --no-default-features --features component "wasm-tools@$WASM_TOOLS_VERSION" >&2
        log "  done in $(secs "$t") s"
    fi
    if [ -f "$TOOLS/cargo/bin/wit-bindgen" ] && [ -f "$TOOLS/cargo/bin/wasm-tools" ]; then
        rm -rf "$TOOLS/cargo-build"
    fi
    if [ ! -f "$ADAPTER" ]; then
        # The adapter is a file inside a crates.io crate: fetch that crate
        # with a throw-away manifest and copy the file out of cargo's cache.
        local m="$TOOLS/adapter-fetch"
        mkdir -p "$m/src"
        cat > "$m/Cargo.toml" <<EOF
[package]
name = "adapter-fetch"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
wasi-preview1-component-adapter-provider = "=$ADAPTER_VERSION"
[workspace]
EOF
        : > "$m/src/lib.rs"
        cargo fetch --quiet --manifest-path "$m/Cargo.toml" >&2
        local src
        src="$(cargo metadata --quiet --format-version 1 --manifest-path "$m/Cargo.toml" \
            | python3 -c 'import json,sys; d=json.load(sys.stdin); print(next(p["manifest_path"] for p in d["packages"] if p["name"]=="wasi-preview1-component-adapter-provider"))')"
        cp "$(dirname "$src")/artefacts/wasi_snapshot_preview1.reactor.wasm" "$ADAPTER.tmp"
        mv "$ADAPTER.tmp" "$ADAPTER"
    fi
}

if [ "$need_python" -eq 1 ]; then install_python; fi
if [ "$need_js" -eq 1 ]; then install_js; fi
if [ "$need_c" -eq 1 ]; then install_c; fi

# ---------------------------------------------------------------- builds
# A component starts with "\0asm" and the component version/layer 0d 00 01 00.
COMPONENT_MAGIC="0061736d0d000100"

stamp_of() {
    local d="$1" lang="$2"
    {
        echo "$lang $PY_VERSION $JS_VERSION $WIT_BINDGEN_VERSION $WASM_TOOLS_VERSION $ADAPTER_VERSION"
        declare -f build_python build_js build_c world_of
        find "$WIT_ROOT" "$d" -type f \( -name '*.wit' -o -name '*.py' -o -name '*.js' -o -name '*.c' -o -name '*.h' -o -name WORLD \) \
            -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum
    } | sha256sum | cut -d' ' -f1
}

build_python() { # dir out
    "$COMPONENTIZE_PY" -d "$WIT" -w "$WORLD" componentize app -p "$1" -o "$2" >&2
}

build_js() { # dir out
    # -d drops the engine features that would import WASI and wasi:http; stdio
    # stays so console.log and uncaught errors reach the proxy's log.
    "$COMPONENTIZE_JS" --wit "$WIT" --world-name "$WORLD" \
        -d random clocks http fetch-event -o "$2" "$1/filter.js" >&2
}

build_c() { # dir out
    local work="$BUILD/c-$(basename "$1")"
    rm -rf "$work"; mkdir -p "$work/gen"
    local out
    if ! out="$("$WIT_BINDGEN" c "$WIT" --world "$WORLD" --out-dir "$work/gen" 2>&1)"; then
        log "$out"
        return 1
    fi
    "$CLANG" --target=wasm32-wasi --sysroot=/usr -mexec-model=reactor \
        -O2 -Wall -Wextra -Werror -Wno-unused-parameter \
        -I "$work/gen" -I "$1" \
        -Wl,-z,stack-size=65536 -Wl,--strip-all \
        -o "$work/core.wasm" "$1"/*.c "$work/gen/${WORLD//-/_}.c" "$work/gen/${WORLD//-/_}_component_type.o"
    "$WASM_TOOLS" component new "$work/core.wasm" \
        --adapt "wasi_snapshot_preview1=$ADAPTER" -o "$2"
}

# Kept builds not used for a month go.
if [ -d "$TOOLS/built" ]; then find "$TOOLS/built" -name '*.wasm' -mtime +30 -delete; fi

failed=0
build_all() { # out_dir dirs...
    local out="$1"; shift
    mkdir -p "$out"
    local d
    for d in "$@"; do
        local name lang dest stamp stamp_file t
        name="$(basename "$d")"
        lang="$(lang_of "$d")"
        world_of "$d"
        dest="$out/$name.wasm"
        stamp="$(stamp_of "$d" "$lang")"
        stamp_file="$BUILD/$(echo "$out" | sha256sum | cut -c1-8)-$name.stamp"
        if [ -f "$dest" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ]; then
            printf '%-24s %-11s %10s  (up to date)\n' "$name" "$lang" "$(wc -c < "$dest" | tr -d ' ')"
            continue
        fi
        t="$(now)"
        local tmp="$BUILD/$name.staged.wasm"
        local kept="$TOOLS/built/$stamp.wasm"
        rm -f "$tmp"
        local how="built in"
        if [ -f "$kept" ]; then
            how="kept build, copied in"
            # Built before from the same sources, WIT and tools (e.g. by an
            # earlier CI run on this machine, in another clone).
            cp "$kept" "$tmp" && touch "$kept"
        elif ! "build_$( [ "$lang" = javascript ] && echo js || echo "$lang")" "$d" "$tmp"; then
            log "error: $name ($lang) failed to build"
            failed=1
            continue
        fi
        local magic
        magic="$(head -c 8 "$tmp" | od -An -tx1 | tr -d ' \n')"
        if [ "$magic" != "$COMPONENT_MAGIC" ]; then
            log "error: $name: $tmp is not a component (header $magic)"
            failed=1
            continue
        fi
        if [ ! -f "$kept" ]; then
            mkdir -p "$TOOLS/built"
            cp "$tmp" "$kept.tmp" && mv -f "$kept.tmp" "$kept"
        fi
        # Atomically, and only when changed (the proxy watches this folder).
        if ! cmp -s "$tmp" "$dest"; then mv -f "$tmp" "$dest"; else rm -f "$tmp"; fi
        echo "$stamp" > "$stamp_file"
        printf '%-24s %-11s %10s  %s %s s\n' "$name" "$lang" "$(wc -c < "$dest" | tr -d ' ')" "$how" "$(secs "$t")"
    done
}

printf '%-24s %-11s %10s\n' "filter" "language" "bytes"
if [ "${#dirs[@]}" -gt 0 ]; then build_all "$OUT_DIR" "${dirs[@]}"; fi
if [ "${#template_dirs[@]}" -gt 0 ]; then build_all "$ROOT/target/lang-templates" "${template_dirs[@]}"; fi
[ "$failed" -eq 0 ] || die "some filters failed to build"
echo "components in ${OUT_DIR#"$ROOT"/}/"
